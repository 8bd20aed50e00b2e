//! `TokenCache`: one valid token, always at hand.
//!
//! * Single-flight: any number of callers finding no token cause one fetch
//!   (moka's `try_get_with` coalesces them).
//! * Refresh-ahead: inside `refresh_before_expiry` the first caller starts
//!   one background refresh; everybody keeps the current token meanwhile.
//! * A failed refresh keeps the still-valid token. With no valid token, a
//!   failure is remembered with growing backoff, so callers get the error at
//!   once instead of each starting a fetch.
//! * `reject(&token)` (an upstream answered `401`) drops the token only if
//!   it is still the cached one, and only within the forced-refresh budget
//!   ([`CacheOptions::forced_refreshes_per_minute`]); otherwise the caller
//!   hands the `401` back.
//!
//! Validity is judged on tokio's clock (so `tokio::time::pause` controls
//! it); moka's own expiry, on its own clock, only evicts dead entries.

use std::{
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwapOption;
use moka::{Expiry, future::Cache, ops::compute::Op};
use tokio::time::Instant;
use tracing::Instrument;

mod forced_refresh;

use self::forced_refresh::{ForcedRefreshBudget, ForcedRefreshDecision};
use crate::{
    metric_names,
    oidc::ErrorClass,
    retry::{Backoff, Jitter},
    token::{Reuse, Token, TokenError, TokenSource},
};

/// Settings of a [`TokenCache`].
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// The name of the token source, the `source` label of the cache's
    /// metrics (default `"default"`).
    pub name: String,
    /// Start a background refresh when the token has less than this left.
    pub refresh_before_expiry: Duration,
    /// Treat a token as expired when it has less than this left, so a
    /// request never leaves with a token that dies in flight.
    pub expiry_margin: Duration,
    /// How long to remember a transient or throttled failure.
    pub transient_backoff: Backoff,
    /// How long to remember a fatal failure (a bad refresh token will not
    /// heal by itself; hammering the service does not help).
    pub fatal_backoff: Backoff,
    /// Refreshes that upstream `401`s may force in any 60 seconds, all
    /// tokens together (default 3). Each token is refreshed because of a
    /// `401` at most once; beyond the budget the `401` is handed back and
    /// the token kept. 0: a `401` never causes a refresh.
    pub forced_refreshes_per_minute: u32,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            name: "default".to_owned(),
            refresh_before_expiry: Duration::from_secs(300),
            expiry_margin: Duration::from_secs(10),
            transient_backoff: Backoff {
                base: Duration::from_secs(1),
                factor: 2.0,
                cap: Duration::from_secs(30),
                jitter: Jitter::Equal,
            },
            fatal_backoff: Backoff {
                base: Duration::from_secs(5),
                factor: 2.0,
                cap: Duration::from_secs(300),
                jitter: Jitter::Equal,
            },
            forced_refreshes_per_minute: 3,
        }
    }
}

/// No valid token could be had. Says why, and when to try again.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no valid token ({}): {source}", source.kind_name())]
#[non_exhaustive]
pub struct TokenUnavailable {
    /// The failure behind it.
    #[source]
    pub source: TokenError,
    /// When a new attempt will be made.
    pub retry_after: Duration,
}

impl TokenUnavailable {
    /// `source` failed; the next attempt will be made in `retry_after`.
    pub fn new(source: TokenError, retry_after: Duration) -> Self {
        Self {
            source,
            retry_after,
        }
    }

    /// Short error kind (`InvalidGrant`, `SlowDown`, `Connect`, ...).
    pub fn kind(&self) -> &'static str {
        self.source.kind_name()
    }

    /// Class of the underlying failure.
    pub fn class(&self) -> ErrorClass {
        self.source.class()
    }
}

/// What to do with a request whose token an upstream rejected (`401`); see
/// [`TokenCache::reject`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// The rejected token is no longer handed out: a request may be sent
    /// again with the token [`TokenCache::get`] returns. Either this
    /// rejection forced a refresh, or the token had already been dropped or
    /// replaced (then no further refresh is made).
    Refresh,
    /// The forced-refresh budget is spent: the token is kept, and the
    /// `401` should go back to the client unchanged, without a replay.
    Limited,
}

/// Result of [`TokenCache::lookup`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Lookup {
    /// A valid token outside its refresh window.
    Hit(Arc<Token>),
    /// A valid token inside its refresh window; a background refresh is
    /// running or was started.
    RefreshAhead(Arc<Token>),
    /// No valid token: call [`TokenCache::get`].
    Miss,
}

/// Counters of what the cache did; see [`TokenCache::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Fetches that produced a token.
    pub fetch_success: u64,
    /// Fetches that failed throttled (after retries).
    pub fetch_throttled: u64,
    /// Fetches that failed transiently (after retries).
    pub fetch_transient: u64,
    /// Fetches that failed fatally.
    pub fetch_fatal: u64,
    /// Background refreshes started.
    pub refresh_ahead: u64,
    /// Background refreshes that failed (the old token was kept).
    pub refresh_ahead_failed: u64,
    /// Callers answered from a remembered failure without a fetch.
    pub failures_served_from_memory: u64,
    /// Tokens invalidated after an upstream rejected them (forced
    /// refreshes allowed).
    pub invalidations: u64,
    /// Upstream rejections turned away because the forced-refresh budget
    /// was spent.
    pub forced_refreshes_limited: u64,
}

#[derive(Default)]
struct Counters {
    fetch_success: AtomicU64,
    fetch_throttled: AtomicU64,
    fetch_transient: AtomicU64,
    fetch_fatal: AtomicU64,
    refresh_ahead: AtomicU64,
    refresh_ahead_failed: AtomicU64,
    failures_served_from_memory: AtomicU64,
    invalidations: AtomicU64,
    forced_refreshes_limited: AtomicU64,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct CacheKey(Arc<(String, Vec<String>)>);

struct Failure {
    error: TokenError,
    until: Instant,
    streak: u32,
}

/// Refresh-ahead bookkeeping, touched only inside the refresh window.
#[derive(Default)]
struct RefreshAhead {
    /// Token id a refresh was started for (one refresh per token).
    started_for: u64,
    in_flight: bool,
    /// After a failed background refresh, when to try again.
    not_before: Option<Instant>,
    failures: u32,
}

struct TokenExpiry;

impl Expiry<CacheKey, Arc<Token>> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<Token>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl())
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &Arc<Token>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        // Without this, a replaced entry would keep its predecessor's deadline.
        Some(value.ttl())
    }
}

struct Inner {
    source: Arc<dyn TokenSource>,
    key: CacheKey,
    store: Cache<CacheKey, Arc<Token>>,
    hot: ArcSwapOption<Token>,
    options: CacheOptions,
    failure: Mutex<Option<Failure>>,
    refresh: Mutex<RefreshAhead>,
    rejected: AtomicU64,
    /// Refreshes upstream `401`s may still force; taken under this lock
    /// together with the decision about the token.
    forced_refreshes: Mutex<ForcedRefreshBudget>,
    counters: Counters,
}

/// A cache of the token of one [`TokenSource`]. Cheap to clone; clones share
/// everything.
///
/// # Example
///
/// ```
/// use std::time::Duration;
///
/// use sso_token_proxy::{
///     CacheOptions, Lookup, Reuse, Secret, Token, TokenCache, TokenSource, token::FetchFuture,
/// };
///
/// // A source with one fixed token; real code uses `RefreshTokenSource`.
/// struct Fixed;
///
/// impl TokenSource for Fixed {
///     fn identity(&self) -> String {
///         "fixed".into()
///     }
///     fn scopes(&self) -> &[String] {
///         &[]
///     }
///     fn fetch(&self, _reuse: Reuse) -> FetchFuture<'_> {
///         Box::pin(async { Ok(Token::new(Secret::new("abc123"), Duration::from_secs(3600))) })
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cache = TokenCache::new(Fixed, CacheOptions::default());
/// assert!(matches!(cache.lookup(), Lookup::Miss));
///
/// // The first caller fetches; later ones are answered from memory.
/// let token = cache.get().await?;
/// assert_eq!(token.access_token().expose(), "abc123");
/// assert!(matches!(cache.lookup(), Lookup::Hit(t) if t.id() == token.id()));
/// assert_eq!(cache.stats().fetch_success, 1);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct TokenCache {
    inner: Arc<Inner>,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCache")
            .field("name", &self.inner.options.name)
            .field("source", &self.inner.key.0.0)
            .field("scopes", &self.inner.key.0.1)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

impl TokenCache {
    /// A cache in front of `source`.
    pub fn new(source: impl TokenSource, options: CacheOptions) -> Self {
        Self::from_arc(Arc::new(source), options)
    }

    /// A cache in front of a shared source.
    pub fn from_arc(source: Arc<dyn TokenSource>, options: CacheOptions) -> Self {
        let key = CacheKey(Arc::new((source.identity(), source.scopes().to_vec())));
        let store = Cache::builder()
            .max_capacity(16)
            .expire_after(TokenExpiry)
            .build();
        Self {
            inner: Arc::new(Inner {
                source,
                key,
                store,
                hot: ArcSwapOption::empty(),
                forced_refreshes: Mutex::new(ForcedRefreshBudget::new(
                    options.forced_refreshes_per_minute,
                )),
                options,
                failure: Mutex::new(None),
                refresh: Mutex::new(RefreshAhead::default()),
                rejected: AtomicU64::new(0),
                counters: Counters::default(),
            }),
        }
    }

    /// The settings.
    pub fn options(&self) -> &CacheOptions {
        &self.inner.options
    }

    /// A valid token: from memory when there is one, otherwise from one
    /// shared fetch.
    pub async fn get(&self) -> Result<Arc<Token>, TokenUnavailable> {
        if let Some(token) = self.try_get_now() {
            return Ok(token);
        }
        self.get_slow().await
    }

    /// The hit path: a valid token without waiting, or `None` when one must
    /// be fetched. Starts a background refresh inside the refresh window.
    pub fn try_get_now(&self) -> Option<Arc<Token>> {
        match self.lookup() {
            Lookup::Hit(t) | Lookup::RefreshAhead(t) => Some(t),
            Lookup::Miss => None,
        }
    }

    /// Like [`try_get_now`](Self::try_get_now), saying whether the token is
    /// inside its refresh window (for tracing).
    pub fn lookup(&self) -> Lookup {
        let inner = &*self.inner;
        let guard = inner.hot.load();
        let Some(token) = guard.as_ref() else {
            return Lookup::Miss;
        };
        let now = Instant::now();
        if now + inner.options.expiry_margin >= token.expires_at() {
            return Lookup::Miss;
        }
        if now + self.refresh_window(token) >= token.expires_at() {
            self.maybe_refresh_ahead(token, now);
            return Lookup::RefreshAhead(Arc::clone(token));
        }
        Lookup::Hit(Arc::clone(token))
    }

    /// The refresh window for this token: `refresh_before_expiry`, but at
    /// most half the token's lifetime, so short-lived tokens are not
    /// refreshed continuously.
    fn refresh_window(&self, token: &Token) -> Duration {
        self.inner
            .options
            .refresh_before_expiry
            .min(token.lifetime() / 2)
    }

    /// The current token if it is still valid, without side effects. For
    /// readiness checks and metrics.
    pub fn current(&self) -> Option<Arc<Token>> {
        let guard = self.inner.hot.load();
        let token = guard.as_ref()?;
        (Instant::now() + self.inner.options.expiry_margin < token.expires_at())
            .then(|| Arc::clone(token))
    }

    /// The remembered failure, if callers are currently being turned away.
    pub fn last_failure(&self) -> Option<TokenUnavailable> {
        let failure = self.inner.failure.lock().expect("failure lock");
        let now = Instant::now();
        failure.as_ref().map(|f| TokenUnavailable {
            source: f.error.clone(),
            retry_after: f.until.saturating_duration_since(now),
        })
    }

    /// Forgets a remembered failure, so the next caller fetches at once
    /// (after credentials were replaced).
    pub fn clear_failure(&self) {
        *self.inner.failure.lock().expect("failure lock") = None;
    }

    /// The name of the token source (the `source` label of its metrics).
    pub fn name(&self) -> &str {
        &self.inner.options.name
    }

    /// An upstream rejected `token` (the token that very request carried)
    /// with `401`. Decides whether that forces a refresh:
    ///
    /// * a token already rejected, or already replaced by a newer one,
    ///   forces nothing: [`Rejection::Refresh`], and [`get`](Self::get)
    ///   answers with the newer token (or the one fetch under way);
    /// * the current token is dropped, so the next caller fetches a new
    ///   one, when the forced-refresh budget allows:
    ///   [`Rejection::Refresh`];
    /// * otherwise the token is kept: [`Rejection::Limited`].
    ///
    /// Counted in `sso_token_proxy_forced_refreshes_total{source,decision}`.
    pub fn reject(&self, token: &Token) -> Rejection {
        let inner = &*self.inner;
        let id = token.id();
        let decision = {
            let mut budget = inner.forced_refreshes.lock().expect("budget lock");
            let current = inner.hot.load_full();
            let superseded = inner.rejected.load(Ordering::SeqCst) == id
                || current.as_ref().is_some_and(|c| c.id() != id);
            if superseded {
                ForcedRefreshDecision::Superseded
            } else if budget.try_take(Instant::now()) {
                inner.rejected.store(id, Ordering::SeqCst);
                inner.hot.compare_and_swap(&current, None);
                ForcedRefreshDecision::Allowed
            } else {
                ForcedRefreshDecision::Limited
            }
        };
        metrics::counter!(
            metric_names::FORCED_REFRESHES_TOTAL.name,
            "source" => inner.options.name.clone(),
            "decision" => decision.as_str()
        )
        .increment(1);
        match decision {
            ForcedRefreshDecision::Allowed => {
                inner.counters.invalidations.fetch_add(1, Ordering::Relaxed);
                metrics::counter!(metric_names::TOKEN_INVALIDATIONS_TOTAL.name, "source" => inner.options.name.clone())
                    .increment(1);
                tracing::info!(
                    token_id = id,
                    "token rejected upstream; dropped, the next request fetches a new one"
                );
                Rejection::Refresh
            }
            ForcedRefreshDecision::Superseded => {
                tracing::debug!(token_id = id, "rejected token was already replaced");
                Rejection::Refresh
            }
            ForcedRefreshDecision::Limited => {
                inner
                    .counters
                    .forced_refreshes_limited
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    token_id = id,
                    limit = inner.options.forced_refreshes_per_minute,
                    "token rejected upstream, but the forced-refresh budget is spent; \
                     the token is kept and the 401 handed back"
                );
                Rejection::Limited
            }
        }
    }

    /// Counters of fetches and refreshes.
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            fetch_success: load(&c.fetch_success),
            fetch_throttled: load(&c.fetch_throttled),
            fetch_transient: load(&c.fetch_transient),
            fetch_fatal: load(&c.fetch_fatal),
            refresh_ahead: load(&c.refresh_ahead),
            refresh_ahead_failed: load(&c.refresh_ahead_failed),
            failures_served_from_memory: load(&c.failures_served_from_memory),
            invalidations: load(&c.invalidations),
            forced_refreshes_limited: load(&c.forced_refreshes_limited),
        }
    }

    // === slow path ===

    async fn get_slow(&self) -> Result<Arc<Token>, TokenUnavailable> {
        let inner = &*self.inner;
        // A stale moka entry (moka's clock lags a paused tokio clock) is
        // removed and the lookup repeated; twice is enough.
        for _ in 0..3 {
            if let Some(err) = self.remembered_failure() {
                return Err(err);
            }
            let this = self.clone();
            let result = inner
                .store
                .try_get_with(
                    inner.key.clone(),
                    async move { this.fetch_and_publish().await },
                )
                .await;
            match result {
                // A token an upstream rejected is stale too: a caller that
                // read it just before the invalidation may have re-inserted it.
                Ok(token) if self.usable(&token) && !self.is_rejected(&token) => {
                    self.publish(&token);
                    return Ok(token);
                }
                Ok(stale) => self.remove_if_holds(stale.id()).await,
                Err(shared) => {
                    let (error, retry_after) = (*shared).clone();
                    return Err(TokenUnavailable {
                        source: error,
                        retry_after,
                    });
                }
            }
        }
        Err(TokenUnavailable {
            source: TokenError::NoRefreshToken(
                "the source keeps returning expired tokens".to_owned(),
            ),
            retry_after: inner.options.transient_backoff.base,
        })
    }

    fn remembered_failure(&self) -> Option<TokenUnavailable> {
        let failure = self.inner.failure.lock().expect("failure lock");
        let f = failure.as_ref()?;
        let now = Instant::now();
        if now >= f.until {
            return None;
        }
        self.inner
            .counters
            .failures_served_from_memory
            .fetch_add(1, Ordering::Relaxed);
        Some(TokenUnavailable {
            source: f.error.clone(),
            retry_after: f.until - now,
        })
    }

    fn usable(&self, token: &Token) -> bool {
        Instant::now() + self.inner.options.expiry_margin < token.expires_at()
    }

    /// Runs once per miss, inside moka's single-flight.
    async fn fetch_and_publish(&self) -> Result<Arc<Token>, (TokenError, Duration)> {
        match self.fetch(FetchKind::Miss).await {
            Ok(token) => {
                self.publish(&token);
                Ok(token)
            }
            Err(error) => Err(self.record_failure(error)),
        }
    }

    /// Asks the source, never accepting back a token an upstream rejected.
    async fn fetch(&self, kind: FetchKind) -> Result<Arc<Token>, TokenError> {
        let span =
            tracing::info_span!("token_fetch", source = %self.inner.key.0.0, kind = kind.as_str());
        self.fetch_inner().instrument(span).await
    }

    async fn fetch_inner(&self) -> Result<Arc<Token>, TokenError> {
        let inner = &*self.inner;
        let min_ttl = inner.options.refresh_before_expiry + inner.options.expiry_margin;
        let started = Instant::now();
        let mut result = inner.source.fetch(Reuse::IfValidFor(min_ttl)).await;
        if let Ok(token) = &result
            && token.id() == inner.rejected.load(Ordering::Acquire)
        {
            result = inner.source.fetch(Reuse::Never).await;
        }
        let outcome = match &result {
            Ok(_) => {
                inner.counters.fetch_success.fetch_add(1, Ordering::Relaxed);
                "success"
            }
            Err(e) => match e.class() {
                ErrorClass::Throttled => {
                    inner
                        .counters
                        .fetch_throttled
                        .fetch_add(1, Ordering::Relaxed);
                    "throttled"
                }
                ErrorClass::Transient => {
                    inner
                        .counters
                        .fetch_transient
                        .fetch_add(1, Ordering::Relaxed);
                    "transient"
                }
                ErrorClass::Fatal | ErrorClass::Pending => {
                    inner.counters.fetch_fatal.fetch_add(1, Ordering::Relaxed);
                    "fatal"
                }
            },
        };
        let source = inner.options.name.clone();
        metrics::counter!(metric_names::TOKEN_FETCHES_TOTAL.name, "source" => source.clone(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!(metric_names::TOKEN_FETCH_DURATION_SECONDS.name, "source" => source)
            .record(started.elapsed().as_secs_f64());
        match &result {
            Ok(token) => tracing::info!(outcome, ttl_s = token.ttl().as_secs(), "token fetched"),
            Err(e) => {
                tracing::warn!(outcome, kind = e.kind_name(), error = %e, "token fetch failed")
            }
        }
        result.map(Arc::new)
    }

    fn is_rejected(&self, token: &Token) -> bool {
        token.id() == self.inner.rejected.load(Ordering::Acquire)
    }

    fn publish(&self, token: &Arc<Token>) {
        let inner = &*self.inner;
        // Under the lock `reject` decides in, so a token rejected meanwhile
        // is never published.
        let _deciding = inner.forced_refreshes.lock().expect("budget lock");
        if self.is_rejected(token) {
            return;
        }
        let current = inner.hot.load();
        if current.as_ref().is_some_and(|c| c.id() == token.id()) {
            return;
        }
        // Never replace a token with one that expires earlier.
        if current.as_ref().is_some_and(|c| {
            c.expires_at() > token.expires_at() && c.id() != inner.rejected.load(Ordering::Acquire)
        }) {
            return;
        }
        inner.hot.store(Some(Arc::clone(token)));
        *inner.failure.lock().expect("failure lock") = None;
    }

    fn record_failure(&self, error: TokenError) -> (TokenError, Duration) {
        let options = &self.inner.options;
        let mut failure = self.inner.failure.lock().expect("failure lock");
        let streak = failure.as_ref().map_or(0, |f| f.streak) + 1;
        let backoff = match error.class() {
            ErrorClass::Fatal | ErrorClass::Pending => &options.fatal_backoff,
            ErrorClass::Transient | ErrorClass::Throttled => &options.transient_backoff,
        };
        let delay = backoff.delay(streak - 1).max(Duration::from_millis(1));
        *failure = Some(Failure {
            error: error.clone(),
            until: Instant::now() + delay,
            streak,
        });
        (error, delay)
    }

    async fn remove_if_holds(&self, id: u64) {
        let inner = &*self.inner;
        inner
            .store
            .entry(inner.key.clone())
            .and_compute_with(|entry| {
                let op = match entry {
                    Some(e) if e.value().id() == id => Op::Remove,
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
    }

    // === refresh-ahead ===

    fn maybe_refresh_ahead(&self, token: &Token, now: Instant) {
        {
            let mut state = self.inner.refresh.lock().expect("refresh lock");
            if state.in_flight
                || state.started_for == token.id()
                || state.not_before.is_some_and(|t| now < t)
            {
                return;
            }
            state.in_flight = true;
            state.started_for = token.id();
        }
        let old_expiry = token.expires_at();
        self.inner
            .counters
            .refresh_ahead
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!(metric_names::REFRESH_AHEAD_TOTAL.name, "source" => self.inner.options.name.clone())
            .increment(1);
        let this = self.clone();
        tokio::spawn(async move {
            let result = this.fetch(FetchKind::RefreshAhead).await;
            let mut refreshed = false;
            if let Ok(token) = &result {
                refreshed = token.expires_at() > old_expiry;
                this.inner
                    .store
                    .insert(this.inner.key.clone(), Arc::clone(token))
                    .await;
                this.publish(token);
            }
            let mut state = this.inner.refresh.lock().expect("refresh lock");
            state.in_flight = false;
            if refreshed {
                state.failures = 0;
                state.not_before = None;
            } else {
                // Keep the valid token; try again after a pause, not on
                // every request.
                state.failures += 1;
                this.inner
                    .counters
                    .refresh_ahead_failed
                    .fetch_add(1, Ordering::Relaxed);
                let delay = this
                    .inner
                    .options
                    .transient_backoff
                    .delay(state.failures - 1);
                state.not_before = Some(Instant::now() + delay);
                state.started_for = 0;
            }
        });
    }
}

#[derive(Clone, Copy)]
enum FetchKind {
    Miss,
    RefreshAhead,
}

impl FetchKind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Miss => "miss",
            Self::RefreshAhead => "refresh_ahead",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use futures_util::FutureExt;

    use super::*;
    use crate::{
        oidc::{OidcError, Operation, ServiceErrorKind},
        secret::Secret,
        token::FetchFuture,
    };

    #[derive(Default)]
    struct FakeState {
        calls: AtomicU64,
        lifetime: Mutex<Duration>,
        delay: Duration,
        script: Mutex<VecDeque<ServiceErrorKind>>,
        always_fail: Mutex<Option<ServiceErrorKind>>,
    }

    #[derive(Clone)]
    struct Fake(Arc<FakeState>);

    impl Fake {
        fn new(lifetime: Duration, delay: Duration) -> Self {
            Self(Arc::new(FakeState {
                lifetime: Mutex::new(lifetime),
                delay,
                ..Default::default()
            }))
        }
        fn calls(&self) -> u64 {
            self.0.calls.load(Ordering::SeqCst)
        }
    }

    fn service_error(kind: ServiceErrorKind) -> TokenError {
        TokenError::Oidc(OidcError::Service {
            operation: Operation::CreateToken,
            kind,
            details: Box::default(),
        })
    }

    impl TokenSource for Fake {
        fn identity(&self) -> String {
            "fake".into()
        }
        fn scopes(&self) -> &[String] {
            &[]
        }
        fn fetch(&self, _reuse: Reuse) -> FetchFuture<'_> {
            Box::pin(async move {
                let n = self.0.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.0.delay).await;
                let scripted = self.0.script.lock().unwrap().pop_front();
                if let Some(kind) = scripted.or(*self.0.always_fail.lock().unwrap()) {
                    return Err(service_error(kind));
                }
                let lifetime = *self.0.lifetime.lock().unwrap();
                Ok(Token::new(Secret::new(format!("tok-{n}")), lifetime))
            })
        }
    }

    fn options(window: u64) -> CacheOptions {
        CacheOptions {
            refresh_before_expiry: Duration::from_secs(window),
            expiry_margin: Duration::from_secs(1),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cold_burst_is_one_fetch() {
        let fake = Fake::new(Duration::from_secs(3600), Duration::from_millis(100));
        let cache = TokenCache::new(fake.clone(), options(300));
        let gets = (0..1000).map(|_| {
            let c = cache.clone();
            tokio::spawn(async move { c.get().await.map(|t| t.id()) })
        });
        let ids: Vec<_> = futures_util::future::join_all(gets).await;
        let first = ids[0].as_ref().unwrap().as_ref().unwrap();
        assert!(
            ids.iter()
                .all(|r| r.as_ref().unwrap().as_ref().unwrap() == first)
        );
        assert_eq!(fake.calls(), 1);
        assert_eq!(cache.stats().fetch_success, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn one_background_refresh_per_window_and_nobody_waits() {
        let fake = Fake::new(Duration::from_secs(100), Duration::from_secs(2));
        let cache = TokenCache::new(fake.clone(), options(20));
        let mut current = cache.get().await.unwrap();
        assert_eq!(fake.calls(), 1);
        for window in 1..=5u64 {
            // Outside the window: plain hits.
            tokio::time::advance(Duration::from_secs(70)).await;
            assert_eq!(cache.try_get_now().unwrap().id(), current.id());
            assert_eq!(fake.calls(), window);
            // Inside it: every caller gets the current token at once while
            // exactly one refresh runs.
            tokio::time::advance(Duration::from_secs(15)).await;
            for _ in 0..100 {
                let t = cache
                    .get()
                    .now_or_never()
                    .expect("hit path never waits")
                    .unwrap();
                assert_eq!(t.id(), current.id());
            }
            // Let the spawned refresh start.
            tokio::task::yield_now().await;
            assert_eq!(fake.calls(), window + 1);
            // Let the refresh (2 s) finish.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let next = cache.try_get_now().unwrap();
            assert_ne!(next.id(), current.id());
            current = next;
            assert_eq!(fake.calls(), window + 1);
        }
        assert_eq!(cache.stats().refresh_ahead, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn fatal_failure_is_remembered() {
        let fake = Fake::new(Duration::from_secs(3600), Duration::from_millis(10));
        fake.0
            .always_fail
            .lock()
            .unwrap()
            .replace(ServiceErrorKind::InvalidGrant);
        let cache = TokenCache::new(fake.clone(), options(300));
        let err = cache.get().await.unwrap_err();
        assert_eq!(err.kind(), "InvalidGrant");
        assert!(err.retry_after > Duration::ZERO);
        assert_eq!(fake.calls(), 1);
        // A thousand callers over the next second cause no further call.
        for _ in 0..1000 {
            tokio::time::advance(Duration::from_millis(1)).await;
            let err = cache.get().await.unwrap_err();
            assert_eq!(err.kind(), "InvalidGrant");
        }
        assert_eq!(fake.calls(), 1);
        assert!(cache.stats().failures_served_from_memory >= 1000);
        // After the backoff, one new attempt; the backoff grows.
        tokio::time::advance(Duration::from_secs(6)).await;
        let first_retry_after = cache.get().await.unwrap_err().retry_after;
        assert_eq!(fake.calls(), 2);
        assert!(
            first_retry_after >= Duration::from_secs(5),
            "{first_retry_after:?}"
        );
        // Healing clears the memory.
        fake.0.always_fail.lock().unwrap().take();
        tokio::time::advance(first_retry_after).await;
        assert!(cache.get().await.is_ok());
        assert!(cache.last_failure().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn failed_refresh_keeps_the_valid_token_until_it_expires() {
        let fake = Fake::new(Duration::from_secs(100), Duration::from_millis(10));
        let cache = TokenCache::new(fake.clone(), options(30));
        let t1 = cache.get().await.unwrap();
        fake.0
            .always_fail
            .lock()
            .unwrap()
            .replace(ServiceErrorKind::InternalServer);
        tokio::time::advance(Duration::from_secs(75)).await;
        for _ in 0..200 {
            assert_eq!(cache.get().await.unwrap().id(), t1.id());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Ten seconds of requests inside the window: a few paced refresh
        // attempts, not one per request.
        let calls = fake.calls();
        assert!((2..=6).contains(&calls), "calls = {calls}");
        assert!(cache.stats().refresh_ahead_failed >= 1);
        // Past expiry: a typed error naming the cause.
        tokio::time::advance(Duration::from_secs(20)).await;
        let err = cache.get().await.unwrap_err();
        assert_eq!(err.kind(), "InternalServer");
        assert_eq!(err.class(), ErrorClass::Transient);
    }

    #[tokio::test(start_paused = true)]
    async fn reject_burst_for_one_old_token_is_one_refresh() {
        let fake = Fake::new(Duration::from_secs(3600), Duration::from_millis(50));
        let cache = TokenCache::new(fake.clone(), options(300));
        let old = cache.get().await.unwrap();
        let tasks = (0..100).map(|_| {
            let (c, old) = (cache.clone(), old.clone());
            tokio::spawn(async move {
                assert_eq!(c.reject(&old), Rejection::Refresh);
                c.get().await.unwrap().id()
            })
        });
        let ids: Vec<_> = futures_util::future::join_all(tasks).await;
        assert!(ids.iter().all(|id| *id.as_ref().unwrap() != old.id()));
        assert_eq!(fake.calls(), 2);
        assert_eq!(cache.stats().invalidations, 1);
        // A late rejection of the old token leaves the new one alone.
        let new = cache.get().await.unwrap();
        assert_eq!(cache.reject(&old), Rejection::Refresh);
        assert_eq!(cache.get().await.unwrap().id(), new.id());
        assert_eq!(fake.calls(), 2);
        assert_eq!(cache.stats().invalidations, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn rejections_beyond_the_budget_keep_the_token() {
        let fake = Fake::new(Duration::from_secs(3600), Duration::from_millis(10));
        let cache = TokenCache::new(fake.clone(), options(300));
        // Three forced refreshes a minute, one per token.
        for n in 1..=3 {
            let token = cache.get().await.unwrap();
            assert_eq!(cache.reject(&token), Rejection::Refresh);
            assert!(
                cache.try_get_now().is_none(),
                "the rejected token is dropped"
            );
            assert_ne!(cache.get().await.unwrap().id(), token.id());
            assert_eq!(fake.calls(), n + 1);
        }
        let kept = cache.get().await.unwrap();
        for _ in 0..1000 {
            assert_eq!(cache.reject(&kept), Rejection::Limited);
            assert_eq!(cache.try_get_now().unwrap().id(), kept.id());
        }
        assert_eq!(fake.calls(), 4);
        assert_eq!(cache.stats().forced_refreshes_limited, 1000);
        // The window slides: a minute after the first, one more is allowed.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(cache.reject(&kept), Rejection::Refresh);
        assert_ne!(cache.get().await.unwrap().id(), kept.id());
        assert_eq!(fake.calls(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_token_put_back_by_a_racing_caller_is_not_handed_out() {
        let fake = Fake::new(Duration::from_secs(3600), Duration::from_millis(10));
        let cache = TokenCache::new(fake.clone(), options(300));
        let old = cache.get().await.unwrap();
        assert_eq!(cache.reject(&old), Rejection::Refresh);
        // A caller that read `old` just before the rejection stores it
        // again, as moka's single-flight can.
        cache
            .inner
            .store
            .insert(cache.inner.key.clone(), Arc::clone(&old))
            .await;
        cache.publish(&old);
        let new = cache.get().await.unwrap();
        assert_ne!(new.id(), old.id());
        assert_eq!(fake.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_entry_is_refetched_even_though_moka_still_holds_it() {
        let fake = Fake::new(Duration::from_secs(60), Duration::from_millis(10));
        let cache = TokenCache::new(fake.clone(), options(10));
        let t1 = cache.get().await.unwrap();
        // Jump past expiry without any request in the window.
        tokio::time::advance(Duration::from_secs(120)).await;
        let t2 = cache.get().await.unwrap();
        assert_ne!(t1.id(), t2.id());
        assert!(t2.is_valid());
        assert_eq!(fake.calls(), 2);
    }
}
