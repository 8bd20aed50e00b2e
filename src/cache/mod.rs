//! `TokenCache`: one valid token, always at hand.
//!
//! The cache in front of a [`TokenSource`] is made of focused parts, one
//! private module each:
//!
//! * single-flight fetches (`single_flight`): any number of callers that
//!   find no token cause one fetch;
//! * refresh-ahead (`refresh_ahead`): inside a token's refresh window the
//!   first caller starts one background refresh; everybody keeps the
//!   current token meanwhile;
//! * failure memory (`failure`): a failed refresh keeps the still-valid
//!   token; with no valid token a failure is remembered with growing
//!   backoff, so callers get the error at once instead of each starting a
//!   fetch;
//! * margins (`margins`) that scale with the token's lifetime
//!   ([`scaled_expiry_margin`], [`scaled_refresh_window`]), so tokens of 2 s
//!   and of 12 h are each used for a sensible share of their life, and a
//!   token that arrives unusable is a remembered failure, never a fetch
//!   loop;
//! * the rejected-token set (`rejected`): a token an upstream rejected is
//!   never handed out again, whichever source hands it back (tokens are
//!   identified by their value, [`Token::id`]);
//! * the forced-refresh budget (`forced_refresh`): an upstream `401` drops
//!   the token it was sent with only while the budget allows (see
//!   [`TokenCache::reject`]);
//! * subscriptions ([`TokenCache::subscribe`]): a `watch` of the token
//!   handed out, so token files are rewritten on every refresh;
//! * the keeper (`keeper`, [`TokenCache::keep_fresh`]): keeps the token
//!   fresh with no caller asking, for tokens nobody requests through the
//!   cache (a token-only sidecar);
//! * per-caller tokens ([`CallerTokens`]): one exchanged token per caller of
//!   a route that exchanges each caller's inbound token.
//!
//! Validity is judged on tokio's clock (so `tokio::time::pause` controls
//! it); moka's own expiry, on its own clock, only evicts dead entries.

mod callers;
mod current;
mod failure;
mod forced_refresh;
mod keeper;
mod lifecycle_metrics;
mod margins;
mod refresh_ahead;
mod rejected;
mod single_flight;
mod stats;
#[cfg(test)]
mod tests;

use std::{
    fmt,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tracing::Instrument;

pub use self::{
    callers::{CallerExchange, CallerOptions, CallerTokens, Reexchange},
    margins::{MIN_USABLE_LIFETIME, scaled_expiry_margin, scaled_refresh_window},
    stats::CacheStats,
};
use self::{
    current::CurrentSlot,
    failure::FailureMemory,
    forced_refresh::{ForcedRefreshBudget, ForcedRefreshDecision},
    lifecycle_metrics::LifecycleMetrics,
    margins::Deadlines,
    refresh_ahead::RefreshAheadSchedule,
    rejected::RejectedTokens,
    single_flight::SingleFlight,
    stats::Counters,
};
use crate::{
    metric_names,
    oidc::ErrorClass,
    retry::{Backoff, Jitter},
    token::{PersistStatus, Reuse, Token, TokenError, TokenSource},
};

/// Settings of a [`TokenCache`].
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// The name of the token source, the `source` label of the cache's
    /// metrics (default `"default"`).
    pub name: String,
    /// Start a background refresh when the token has less than this left;
    /// at most half the token's lifetime (see [`scaled_refresh_window`]).
    pub refresh_before_expiry: Duration,
    /// Treat a token as expired when it has less than this left, so a
    /// request never leaves with a token that dies in flight; at most a
    /// quarter of the token's lifetime (see [`scaled_expiry_margin`]).
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

impl CacheOptions {
    /// The expiry margin for `token`: `min(expiry_margin, lifetime / 4)`.
    pub fn expiry_margin_for(&self, token: &Token) -> Duration {
        scaled_expiry_margin(self.expiry_margin, token.lifetime())
    }

    /// The refresh window for `token`:
    /// `min(refresh_before_expiry, lifetime / 2)`.
    pub fn refresh_window_for(&self, token: &Token) -> Duration {
        scaled_refresh_window(self.refresh_before_expiry, token.lifetime())
    }

    fn deadlines(&self, token: &Token) -> Deadlines {
        Deadlines::new(token, self.expiry_margin, self.refresh_before_expiry)
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

/// The token being handed out, with the deadlines computed when it was
/// published.
struct CurrentToken {
    token: Arc<Token>,
    /// When it stops being handed out, and when its refresh is due.
    deadlines: Deadlines,
}

/// Upstream rejections: decided under one lock, which publishing a token
/// also takes, so a token rejected meanwhile is never published.
#[derive(Debug)]
struct Rejections {
    /// Tokens never to hand out again.
    tokens: RejectedTokens,
    /// Refreshes upstream `401`s may still force.
    budget: ForcedRefreshBudget,
}

struct Inner {
    /// Where tokens come from.
    source: Arc<dyn TokenSource>,
    /// `source.identity()`, for spans and `Debug`.
    source_identity: String,
    options: CacheOptions,
    /// The token handed out on the hit path; `None` before the first fetch
    /// and after a forced refresh dropped it.
    current: CurrentSlot,
    /// Where concurrent misses wait for one fetch.
    single_flight: SingleFlight,
    /// The last failed fetch, while callers are answered from it.
    failures: FailureMemory,
    /// When the next background refresh may start.
    refresh_ahead: RefreshAheadSchedule,
    /// Rejected tokens and the forced-refresh budget.
    rejections: Mutex<Rejections>,
    /// What [`TokenCache::stats`] reports.
    counters: Counters,
    lifecycle: LifecycleMetrics,
    /// What `current` holds, for subscribers; sent under the rejections
    /// lock, so subscribers see tokens in the order they were published.
    published: watch::Sender<Option<Arc<Token>>>,
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
            .field("source", &self.inner.source_identity)
            .field("scopes", &self.inner.source.scopes())
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

// === impl TokenCache ===

impl TokenCache {
    /// A cache in front of `source`.
    pub fn new(source: impl TokenSource, options: CacheOptions) -> Self {
        Self::from_arc(Arc::new(source), options)
    }

    /// A cache in front of a shared source.
    pub fn from_arc(source: Arc<dyn TokenSource>, options: CacheOptions) -> Self {
        let source_identity = source.identity();
        Self {
            inner: Arc::new(Inner {
                source,
                source_identity,
                current: CurrentSlot::new(),
                lifecycle: LifecycleMetrics::new(&options.name),
                single_flight: SingleFlight::new(),
                failures: FailureMemory::default(),
                refresh_ahead: RefreshAheadSchedule::default(),
                rejections: Mutex::new(Rejections {
                    tokens: RejectedTokens::default(),
                    budget: ForcedRefreshBudget::new(options.forced_refreshes_per_minute),
                }),
                options,
                counters: Counters::default(),
                published: watch::Sender::new(None),
            }),
        }
    }

    /// The settings.
    pub fn options(&self) -> &CacheOptions {
        &self.inner.options
    }

    /// The name of the token source (the `source` label of its metrics).
    pub fn name(&self) -> &str {
        &self.inner.options.name
    }

    /// The token source.
    pub fn source(&self) -> &Arc<dyn TokenSource> {
        &self.inner.source
    }

    /// Whether the source's newest refresh token is on disk, for sources
    /// that keep one there (see [`TokenSource::persistence`]).
    pub fn persistence(&self) -> Option<PersistStatus> {
        self.inner.source.persistence()
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
        self.lookup_with(|token, refresh_ahead| {
            if refresh_ahead {
                Lookup::RefreshAhead(Arc::clone(token))
            } else {
                Lookup::Hit(Arc::clone(token))
            }
        })
        .unwrap_or(Lookup::Miss)
    }

    /// [`lookup`](Self::lookup) without an `Arc` clone, for the layer's hit
    /// path: `f` gets the token to send now, and whether it is inside its
    /// refresh window, read from this thread's copy (see `current`).
    /// `None`: a miss.
    pub(crate) fn lookup_with<R>(&self, f: impl FnOnce(&Arc<Token>, bool) -> R) -> Option<R> {
        self.inner.current.with_current(|current| {
            let current = current?;
            let now = Instant::now();
            if !current.deadlines.usable_at(now) {
                return None;
            }
            let refresh_ahead = now >= current.deadlines.refresh_from;
            if refresh_ahead {
                self.maybe_refresh_ahead(&current.token, now);
            }
            Some(f(&current.token, refresh_ahead))
        })
    }

    /// The current token if it is still usable, without side effects. For
    /// readiness checks and metrics.
    pub fn current(&self) -> Option<Arc<Token>> {
        let guard = self.inner.current.load();
        let current = guard.as_ref()?;
        current
            .deadlines
            .usable_at(Instant::now())
            .then(|| Arc::clone(&current.token))
    }

    /// Sets the clock-dependent lifecycle gauges of this source (time left on
    /// the token and the registration, `token_valid`, `needs_login`); call
    /// before rendering metrics.
    pub fn publish_metrics(&self) {
        let current = self.current();
        self.inner.lifecycle.publish(
            current.as_deref(),
            self.inner.source.registration_expires_at(),
        );
    }

    /// Whether a person must log in before a new token can be had: SSO-OIDC
    /// refused the refresh token (`InvalidGrant`) at the last fetch, or the
    /// client registration has expired (the `needs_login` gauge).
    pub fn needs_login(&self) -> bool {
        self.inner
            .lifecycle
            .needs_login(self.inner.source.registration_expires_at())
    }

    /// A `watch` of the token handed out: each new token is sent once it is
    /// published (a fetch or a background refresh), and `None` when an
    /// upstream rejection dropped the token. Nothing is sent when a token
    /// merely expires. Subscribing does not make the cache fetch; see
    /// [`keep_fresh`](Self::keep_fresh) for that.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Token>>> {
        self.inner.published.subscribe()
    }

    /// The remembered failure, if callers are currently being turned away.
    pub fn last_failure(&self) -> Option<TokenUnavailable> {
        self.inner.failures.last(Instant::now())
    }

    /// Forgets a remembered failure, so the next caller fetches at once
    /// (after credentials were replaced).
    pub fn clear_failure(&self) {
        self.inner.failures.clear();
    }

    /// An upstream rejected `token` (the token that very request carried)
    /// with `401`. Decides whether that forces a refresh:
    ///
    /// * a token already rejected, or no longer the current one, forces
    ///   nothing: [`Rejection::Refresh`], and [`get`](Self::get) answers
    ///   with the newer token (or the one fetch under way);
    /// * the current token is dropped, so the next caller fetches a new
    ///   one, when the forced-refresh budget allows:
    ///   [`Rejection::Refresh`];
    /// * otherwise the token is kept: [`Rejection::Limited`].
    ///
    /// A dropped token is never handed out again, from any source, until it
    /// expires. Counted in
    /// `sso_token_proxy_forced_refreshes_total{source,decision}`.
    pub fn reject(&self, token: &Token) -> Rejection {
        self.reject_sent(token.id(), token.expires_at())
    }

    /// [`reject`](Self::reject) of the token `id` that expires at
    /// `expires_at`: all it needs of the token, so the layer keeps no `Arc`
    /// of it per request.
    pub(crate) fn reject_sent(&self, id: u64, expires_at: Instant) -> Rejection {
        let inner = &*self.inner;
        let now = Instant::now();
        let decision = {
            let mut rejections = inner.rejections.lock().expect("rejections lock");
            let current = inner.current.load_full();
            let is_current = current.as_ref().is_some_and(|c| c.token.id() == id);
            if rejections.tokens.contains(id, now) || !is_current {
                rejections.tokens.insert(id, expires_at, now);
                ForcedRefreshDecision::Superseded
            } else if rejections.budget.try_take(now) {
                rejections.tokens.insert(id, expires_at, now);
                inner.current.clear_if(&current);
                inner.published.send_replace(None);
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
                Counters::bump(&inner.counters.invalidations);
                metrics::counter!(
                    metric_names::TOKEN_INVALIDATIONS_TOTAL.name,
                    "source" => inner.options.name.clone()
                )
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
                Counters::bump(&inner.counters.forced_refreshes_limited);
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
        self.inner.counters.snapshot()
    }

    // === slow path ===

    async fn get_slow(&self) -> Result<Arc<Token>, TokenUnavailable> {
        let inner = &*self.inner;
        // A stale slot (moka's clock lags a paused tokio clock, or a caller
        // put back a token rejected meanwhile) is emptied and the lookup
        // repeated; the next fetch is fresh, so twice is enough.
        // A background refresh under way ends sooner than a fetch of our
        // own would, and spares a second CreateToken.
        inner.refresh_ahead.wait_if_running().await;
        if let Some(token) = self.try_get_now() {
            return Ok(token);
        }
        let mut unservable = None;
        for _ in 0..3 {
            if let Some(err) = inner.failures.active(Instant::now()) {
                Counters::bump(&inner.counters.failures_served_from_memory);
                return Err(err);
            }
            let this = self.clone();
            let result = inner
                .single_flight
                .get_or_fetch(async move { this.fetch_and_publish().await })
                .await;
            match result {
                Ok(token) => match self.why_unservable(&token) {
                    None => {
                        self.publish(&token);
                        return Ok(token);
                    }
                    Some(why) => {
                        inner.single_flight.remove_if_holds(token.id()).await;
                        unservable = Some(why);
                    }
                },
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
            source: unservable.unwrap_or(TokenError::RejectedAgain),
            retry_after: inner.options.transient_backoff.base,
        })
    }

    /// Why `token` cannot be handed out now, if it cannot.
    fn why_unservable(&self, token: &Token) -> Option<TokenError> {
        let now = Instant::now();
        if self.is_rejected(token.id(), now) {
            return Some(TokenError::RejectedAgain);
        }
        let deadlines = self.inner.options.deadlines(token);
        (!deadlines.usable_at(now)).then(|| TokenError::ExpiredOnArrival {
            left: token.expires_at().saturating_duration_since(now),
            margin: deadlines.margin,
        })
    }

    /// A token fresh from the source: usable, unless it was rejected or
    /// arrived with too little life left.
    fn check_arrival(&self, token: Token) -> Result<Token, TokenError> {
        let now = Instant::now();
        if self.is_rejected(token.id(), now) {
            return Err(TokenError::RejectedAgain);
        }
        let deadlines = self.inner.options.deadlines(&token);
        if deadlines.usable_on_arrival(&token, now) {
            Ok(token)
        } else {
            Err(TokenError::ExpiredOnArrival {
                left: token.expires_at().saturating_duration_since(now),
                margin: deadlines.margin,
            })
        }
    }

    fn is_rejected(&self, id: u64, now: Instant) -> bool {
        let rejections = self.inner.rejections.lock().expect("rejections lock");
        rejections.tokens.contains(id, now)
    }

    /// Runs once per miss, inside the single flight.
    async fn fetch_and_publish(&self) -> Result<Arc<Token>, (TokenError, Duration)> {
        match self.fetch(FetchKind::Miss).await {
            Ok(token) => {
                self.publish(&token);
                Ok(token)
            }
            Err(error) => {
                let delay = self.inner.failures.record(&error, &self.inner.options);
                Err((error, delay))
            }
        }
    }

    /// Asks the source for a token the cache can hand out.
    async fn fetch(&self, kind: FetchKind) -> Result<Arc<Token>, TokenError> {
        let span = tracing::info_span!(
            "token_fetch",
            source = %self.inner.source_identity,
            kind = kind.as_str()
        );
        self.fetch_inner().instrument(span).await
    }

    async fn fetch_inner(&self) -> Result<Arc<Token>, TokenError> {
        let inner = &*self.inner;
        let options = &inner.options;
        let reusable_for = options
            .refresh_before_expiry
            .saturating_add(options.expiry_margin);
        let started = Instant::now();
        let mut result = inner.source.fetch(Reuse::IfValidFor(reusable_for)).await;
        if let Ok(token) = &result
            && self.is_rejected(token.id(), Instant::now())
        {
            // A file or the shared store still lists it as valid.
            tracing::debug!(
                token_id = token.id(),
                "the source handed back a rejected token; asking for a new one"
            );
            result = inner.source.fetch(Reuse::Never).await;
        }
        let result = result.and_then(|token| self.check_arrival(token));
        let outcome = match &result {
            Ok(_) => {
                Counters::bump(&inner.counters.fetch_success);
                "success"
            }
            Err(e) => match e.class() {
                ErrorClass::Throttled => {
                    Counters::bump(&inner.counters.fetch_throttled);
                    "throttled"
                }
                ErrorClass::Transient => {
                    Counters::bump(&inner.counters.fetch_transient);
                    "transient"
                }
                ErrorClass::Fatal | ErrorClass::Pending => {
                    Counters::bump(&inner.counters.fetch_fatal);
                    "fatal"
                }
            },
        };
        inner.lifecycle.record_fetch(
            &result,
            started.elapsed(),
            inner.source.registration_expires_at(),
        );
        match &result {
            Ok(token) => tracing::info!(
                outcome,
                token_id = token.id(),
                ttl_s = token.ttl().as_secs(),
                "token fetched"
            ),
            Err(e) => {
                tracing::warn!(outcome, kind = e.kind_name(), error = %e, "token fetch failed")
            }
        }
        result.map(Arc::new)
    }

    /// Makes `token` the one handed out, unless it was rejected, or the
    /// current token is the same or expires later.
    fn publish(&self, token: &Arc<Token>) {
        let inner = &*self.inner;
        let now = Instant::now();
        {
            let rejections = inner.rejections.lock().expect("rejections lock");
            if rejections.tokens.contains(token.id(), now) {
                return;
            }
            let current = inner.current.load();
            if let Some(c) = current.as_ref()
                && (c.token.id() == token.id()
                    || (c.deadlines.usable_at(now) && c.token.expires_at() > token.expires_at()))
            {
                return;
            }
            inner.current.store(Some(Arc::new(CurrentToken {
                token: Arc::clone(token),
                deadlines: inner.options.deadlines(token),
            })));
            inner.published.send_replace(Some(Arc::clone(token)));
        }
        inner.failures.clear();
    }

    // === refresh-ahead ===

    fn maybe_refresh_ahead(&self, token: &Token, now: Instant) {
        let inner = &*self.inner;
        if !inner.refresh_ahead.try_start(token.id(), now) {
            return;
        }
        Counters::bump(&inner.counters.refresh_ahead);
        metrics::counter!(
            metric_names::REFRESH_AHEAD_TOTAL.name,
            "source" => inner.options.name.clone()
        )
        .increment(1);
        let old_expiry = token.expires_at();
        let this = self.clone();
        tokio::spawn(async move {
            let result = this.fetch(FetchKind::RefreshAhead).await;
            let refreshed = result
                .as_ref()
                .is_ok_and(|token| token.expires_at() > old_expiry);
            if let Ok(token) = &result {
                this.inner.single_flight.insert(Arc::clone(token)).await;
                this.publish(token);
            }
            // On failure the valid token is kept; the next attempt waits.
            let inner = &*this.inner;
            if inner
                .refresh_ahead
                .finish(refreshed, &inner.options.transient_backoff)
                .is_some()
            {
                Counters::bump(&inner.counters.refresh_ahead_failed);
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
