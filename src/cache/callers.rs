//! [`CallerTokens`]: one exchanged token per caller, for a proxy route that
//! exchanges each caller's inbound token (`source = "exchange"`).
//!
//! * **Keyed by a hash.** Entries are keyed by the SHA-256 of the inbound
//!   token, never the token, and each value carries the hash it was issued
//!   for, checked on every read: caller A never gets caller B's token,
//!   whatever the concurrency or eviction.
//! * **Bounded.** A moka cache of at most `max_callers` entries, the least
//!   recently used evicted first; each is also evicted by moka shortly
//!   after its token expires. Whether a token may
//!   still be handed out is decided on tokio's clock, with the margins of
//!   [`TokenCache`](super::TokenCache) scaled by the token's lifetime.
//! * **Single-flight.** Any number of concurrent requests of one caller
//!   cause one exchange (moka's `try_get_with`).
//! * **Refusals remembered.** A fatal answer (`InvalidGrant`,
//!   `ExpiredToken`, `AccessDenied`, ...) is kept for `failure_ttl`, so a
//!   caller with a bad token cannot make the proxy call AWS per request.
//! * **Throttling bounds the rate.** Exchanges run at most
//!   `max_concurrent_exchanges` at once; after `SlowDown` (once the retry
//!   policy has given up) no exchange starts for a backoff that grows while
//!   AWS keeps throttling: callers without a cached token get a `503` with
//!   `Retry-After` meanwhile.
//! * **Upstream `401`s.** [`CallerTokens::reexchange`] drops the caller's
//!   rejected token and exchanges its inbound token again, at most once per
//!   caller per minute (the entry a forced exchange made remembers it);
//!   beyond that the token is kept and the `401` goes back.
//! * **Refresh-ahead.** A hit inside the token's refresh window starts one
//!   background exchange for that caller. It re-uses the caller's inbound
//!   token, which may have expired by then: if that exchange fails the
//!   current token is served until it is no longer usable.

use std::{
    fmt,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use moka::{Expiry, future::Cache, ops::compute::Op, policy::EvictionPolicy};
use sha2::{Digest as _, Sha256};
use tokio::{sync::Semaphore, time::Instant};

use super::{
    TokenUnavailable,
    forced_refresh::{FORCED_REFRESH_WINDOW, ForcedRefreshDecision},
    margins::Deadlines,
};
use crate::{
    metric_names::{
        CALLER_CACHE_ENTRIES, CALLER_CACHE_LOOKUPS_TOTAL, CALLER_EXCHANGES_TOTAL,
        FORCED_REFRESHES_TOTAL, TOKEN_INVALIDATIONS_TOTAL,
    },
    oidc::ErrorClass,
    secret::Secret,
    token::{FetchFuture, Token, TokenError},
};

/// Exchanges one caller's inbound token for a token of the application.
///
/// `IamCallerExchange` (feature `aws-iam`) does it with
/// `CreateTokenWithIAM`; tests count calls with their own.
pub trait CallerExchange: Send + Sync + 'static {
    /// One exchange of `inbound` (retried as the implementation's policy
    /// says, never cached).
    fn exchange(&self, inbound: Secret) -> FetchFuture<'_>;
}

/// Settings of [`CallerTokens`].
#[derive(Debug, Clone)]
pub struct CallerOptions {
    /// The source's name, the `source` label of its metrics.
    pub name: String,
    /// Callers held at most (default 10,000); beyond it the least
    /// recently used is evicted.
    pub max_callers: u64,
    /// How long a refused caller's refusal is remembered (default 30 s).
    pub failure_ttl: Duration,
    /// Exchanges in flight at once (default 32).
    pub max_concurrent_exchanges: usize,
    /// Refresh an active caller's token when it has less than this left
    /// (scaled down for short-lived tokens; default 5 min).
    pub refresh_before_expiry: Duration,
    /// Never hand out a token with less than this left (scaled down for
    /// short-lived tokens; default 10 s).
    pub expiry_margin: Duration,
}

impl Default for CallerOptions {
    fn default() -> Self {
        Self {
            name: "exchange".to_owned(),
            max_callers: 10_000,
            failure_ttl: Duration::from_secs(30),
            max_concurrent_exchanges: 32,
            refresh_before_expiry: Duration::from_secs(300),
            expiry_margin: Duration::from_secs(10),
        }
    }
}

/// SHA-256 of an inbound token: the only form in which it is kept.
type CallerKey = [u8; 32];

fn caller_key(inbound: &Secret) -> CallerKey {
    Sha256::digest(inbound.expose().as_bytes()).into()
}

/// What is held for one caller.
struct Entry {
    /// The caller it was made for (checked on every read).
    key: CallerKey,
    state: EntryState,
    /// A refresh-ahead exchange was started for this entry.
    refresh_claimed: AtomicBool,
    /// Set when an upstream `401` forced this entry's exchange: another
    /// one is refused until [`FORCED_REFRESH_WINDOW`] has passed.
    reexchanged_at: Option<Instant>,
}

enum EntryState {
    Token {
        token: Arc<Token>,
        deadlines: Deadlines,
    },
    Refused {
        error: TokenUnavailable,
        until: Instant,
    },
}

impl Entry {
    fn new(key: CallerKey, state: EntryState) -> Arc<Self> {
        Self::with_reexchange(key, state, None)
    }

    fn with_reexchange(
        key: CallerKey,
        state: EntryState,
        reexchanged_at: Option<Instant>,
    ) -> Arc<Self> {
        Arc::new(Self {
            key,
            state,
            refresh_claimed: AtomicBool::new(false),
            reexchanged_at,
        })
    }

    /// Whether it holds the token `id`.
    fn holds(&self, id: u64) -> bool {
        matches!(&self.state, EntryState::Token { token, .. } if token.id() == id)
    }

    /// How long moka keeps it (on moka's clock; reads judge on tokio's).
    fn moka_ttl(&self) -> Duration {
        match &self.state {
            EntryState::Token { token, .. } => token.ttl(),
            EntryState::Refused { until, .. } => until.saturating_duration_since(Instant::now()),
        }
    }
}

/// Evicts an entry when its token expires or its refusal is forgotten.
struct EntryExpiry;

impl Expiry<CallerKey, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &CallerKey,
        value: &Arc<Entry>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.moka_ttl())
    }

    fn expire_after_update(
        &self,
        _key: &CallerKey,
        value: &Arc<Entry>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.moka_ttl())
    }
}

/// The per-replica throttle gate: after `SlowDown`, no exchange until
/// `until`; the pause doubles while AWS keeps throttling.
#[derive(Debug, Default)]
struct ThrottleGate {
    until: Option<Instant>,
    pause: Duration,
}

const FIRST_THROTTLE_PAUSE: Duration = Duration::from_secs(1);
const MAX_THROTTLE_PAUSE: Duration = Duration::from_secs(60);
/// `Retry-After` for a transient failure (not remembered).
const TRANSIENT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// One exchanged token per caller, keyed by the SHA-256 of the caller's
/// token (checked on every read), bounded by `max_callers`, one exchange
/// per caller however many requests wait, refusals remembered for
/// `failure_ttl`, exchanges paused after `SlowDown`, active callers
/// refreshed ahead. Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct CallerTokens {
    inner: Arc<Inner>,
}

struct Inner {
    options: CallerOptions,
    exchanger: Arc<dyn CallerExchange>,
    entries: Cache<CallerKey, Arc<Entry>>,
    permits: Semaphore,
    gate: Mutex<ThrottleGate>,
    metrics: LookupCounters,
}

impl fmt::Debug for CallerTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallerTokens")
            .field("name", &self.inner.options.name)
            .field("callers", &self.inner.entries.entry_count())
            .finish_non_exhaustive()
    }
}

impl CallerTokens {
    /// A cache in front of `exchanger`.
    pub fn new(exchanger: impl CallerExchange, options: CallerOptions) -> Self {
        let entries = Cache::builder()
            .max_capacity(options.max_callers)
            // LRU, not moka's default TinyLFU: its admission filter may drop
            // a caller just exchanged (paid for again on its next request)
            // or a refusal meant to be remembered for `failure_ttl`.
            .eviction_policy(EvictionPolicy::lru())
            .expire_after(EntryExpiry)
            .build();
        Self {
            inner: Arc::new(Inner {
                permits: Semaphore::new(options.max_concurrent_exchanges.max(1)),
                metrics: LookupCounters::new(&options.name),
                options,
                exchanger: Arc::new(exchanger),
                entries,
                gate: Mutex::new(ThrottleGate::default()),
            }),
        }
    }

    /// The source's name.
    pub fn name(&self) -> &str {
        &self.inner.options.name
    }

    /// Callers held now (moka's count, which lags inserts and evictions
    /// slightly; see [`run_pending_tasks`](Self::run_pending_tasks)).
    pub fn entry_count(&self) -> u64 {
        self.inner.entries.entry_count()
    }

    /// Runs moka's pending evictions, so [`entry_count`](Self::entry_count)
    /// is exact.
    pub async fn run_pending_tasks(&self) {
        self.inner.entries.run_pending_tasks().await;
    }

    /// Sets the `sso_token_proxy_caller_cache_entries` gauge to the
    /// callers held now, after moka's pending evictions (expired tokens
    /// included): the proxy calls it on every scrape.
    pub async fn publish_metrics(&self) {
        self.run_pending_tasks().await;
        self.set_entries_gauge();
    }

    fn set_entries_gauge(&self) {
        metrics::gauge!(CALLER_CACHE_ENTRIES.name, "source" => self.inner.options.name.clone())
            .set(self.entry_count() as f64);
    }

    /// The token for the caller whose inbound token is `inbound`:
    /// cached, or exchanged (once however many of its requests wait).
    /// A refusal of that caller is remembered for `failure_ttl`.
    pub fn get(
        &self,
        inbound: Secret,
    ) -> impl Future<Output = Result<Arc<Token>, TokenUnavailable>> + Send + 'static {
        let this = self.clone();
        async move { this.get_inner(&inbound).await }
    }

    /// Like [`get`](Self::get), handing `inbound` back with the answer, so
    /// that a caller who keeps it (for [`reexchange`](Self::reexchange))
    /// need not copy it for every request: it is copied only for an
    /// exchange.
    #[cfg(feature = "proxy")]
    pub(crate) fn get_keeping(
        &self,
        inbound: Secret,
    ) -> impl Future<Output = (Result<Arc<Token>, TokenUnavailable>, Secret)> + Send + 'static {
        let this = self.clone();
        async move {
            let result = this.get_inner(&inbound).await;
            (result, inbound)
        }
    }

    async fn get_inner(&self, inbound: &Secret) -> Result<Arc<Token>, TokenUnavailable> {
        let key = caller_key(inbound);
        let mut missed = false;
        // Twice at most: a stale entry is dropped once, then exchanged.
        for _ in 0..2 {
            let entry = match self.inner.entries.get(&key).await {
                Some(entry) => entry,
                None => {
                    missed = true;
                    let fill = self.exchange_entry(key, inbound.clone(), None);
                    match self.inner.entries.try_get_with(key, fill).await {
                        Ok(entry) => entry,
                        Err(shared) => {
                            let counter = if matches!(shared.source, TokenError::Throttled) {
                                &self.inner.metrics.gated
                            } else {
                                &self.inner.metrics.miss
                            };
                            counter.increment(1);
                            return Err((*shared).clone());
                        }
                    }
                }
            };
            if entry.key != key {
                // Cannot happen with SHA-256 keys; never hand it out if it does.
                self.remove_if_holds(key, &entry).await;
                continue;
            }
            let now = Instant::now();
            match &entry.state {
                EntryState::Token { token, deadlines } if deadlines.usable_at(now) => {
                    let m = &self.inner.metrics;
                    if missed { &m.miss } else { &m.hit }.increment(1);
                    if now >= deadlines.refresh_from
                        && !entry.refresh_claimed.swap(true, Ordering::AcqRel)
                    {
                        self.refresh_ahead(key, inbound.clone());
                    }
                    return Ok(Arc::clone(token));
                }
                EntryState::Refused { error, until } if now < *until => {
                    self.inner.metrics.refused.increment(1);
                    let mut error = error.clone();
                    error.retry_after = until.saturating_duration_since(now);
                    return Err(error);
                }
                _ => self.remove_if_holds(key, &entry).await,
            }
        }
        self.inner.metrics.miss.increment(1);
        Err(TokenUnavailable::new(
            TokenError::RejectedAgain,
            TRANSIENT_RETRY_AFTER,
        ))
    }

    /// After an upstream answered `401` to `rejected`, the token held for
    /// the caller whose inbound token is `inbound`: if the cache still
    /// holds `rejected`, it is dropped and exchanged again at once, unless
    /// that caller's token was already re-exchanged for a `401` within the
    /// last minute ([`Reexchange::Limited`]: the token is kept, the `401`
    /// goes back). If the cache already holds another token, that one.
    /// Concurrent rejections of one token make one exchange.
    pub fn reexchange(
        &self,
        inbound: Secret,
        rejected: Arc<Token>,
    ) -> impl Future<Output = Reexchange> + Send + 'static {
        let this = self.clone();
        async move { this.reexchange_inner(inbound, &rejected).await }
    }

    async fn reexchange_inner(&self, inbound: Secret, rejected: &Token) -> Reexchange {
        let key = caller_key(&inbound);
        let id = rejected.id();
        let mut outcome: Option<Result<Arc<Token>, TokenUnavailable>> = None;
        let mut decision = ForcedRefreshDecision::Superseded;
        // Under moka's per-key lock: concurrent rejections of this caller
        // wait here, then find the new token.
        self.inner
            .entries
            .entry(key)
            .and_compute_with(|held| {
                let held = held.map(|h| h.into_value());
                let (outcome, decision, inbound) = (&mut outcome, &mut decision, &inbound);
                async move {
                    let Some(entry) = held.filter(|e| e.key == key && e.holds(id)) else {
                        return Op::Nop;
                    };
                    let now = Instant::now();
                    if entry
                        .reexchanged_at
                        .is_some_and(|at| now.saturating_duration_since(at) < FORCED_REFRESH_WINDOW)
                    {
                        *decision = ForcedRefreshDecision::Limited;
                        return Op::Nop;
                    }
                    *decision = ForcedRefreshDecision::Allowed;
                    match self.exchange_entry(key, inbound.clone(), Some(now)).await {
                        Ok(entry) => {
                            if let EntryState::Token { token, .. } = &entry.state {
                                *outcome = Some(Ok(Arc::clone(token)));
                            }
                            Op::Put(entry)
                        }
                        Err(e) => {
                            *outcome = Some(Err(e));
                            Op::Remove
                        }
                    }
                }
            })
            .await;
        self.count_forced(decision);
        match (decision, outcome) {
            (ForcedRefreshDecision::Limited, _) => Reexchange::Limited,
            (_, Some(Ok(token))) => Reexchange::Replay(token),
            (_, Some(Err(e))) => Reexchange::Unavailable(e),
            // Superseded, or exchanged into a remembered refusal: what a
            // request of this caller gets now.
            (_, None) => match self.get_inner(&inbound).await {
                Ok(token) if token.id() != id => Reexchange::Replay(token),
                Ok(_) => Reexchange::Limited,
                Err(e) => Reexchange::Unavailable(e),
            },
        }
    }

    fn count_forced(&self, decision: ForcedRefreshDecision) {
        let name = &self.inner.options.name;
        metrics::counter!(FORCED_REFRESHES_TOTAL.name, "source" => name.clone(), "decision" => decision.as_str())
            .increment(1);
        match decision {
            ForcedRefreshDecision::Allowed => {
                metrics::counter!(TOKEN_INVALIDATIONS_TOTAL.name, "source" => name.clone())
                    .increment(1);
                tracing::debug!(source = %name, "caller's token rejected upstream; exchanged again");
            }
            ForcedRefreshDecision::Limited => {
                tracing::debug!(source = %name, "caller's token rejected upstream again within a minute; the 401 goes back");
            }
            ForcedRefreshDecision::Superseded => {}
        }
    }

    /// The entry a miss puts in the cache: a token, or a remembered
    /// refusal. Throttling and transient failures are not kept.
    fn exchange_entry(
        &self,
        key: CallerKey,
        inbound: Secret,
        reexchanged_at: Option<Instant>,
    ) -> impl Future<Output = Result<Arc<Entry>, TokenUnavailable>> + Send + 'static {
        let this = self.clone();
        async move {
            let result = this.exchange_once(inbound).await;
            let name = &this.inner.options.name;
            let now = Instant::now();
            let entry = match result {
                Ok(token) => {
                    let token = Arc::new(token);
                    let deadlines = this.deadlines(&token);
                    if !deadlines.usable_on_arrival(&token, now) {
                        exchanges(name, "refused");
                        let left = token.expires_at().saturating_duration_since(now);
                        this.refused(
                            key,
                            TokenError::ExpiredOnArrival {
                                left,
                                margin: deadlines.margin,
                            },
                            now,
                        )
                    } else {
                        exchanges(name, "ok");
                        Entry::with_reexchange(
                            key,
                            EntryState::Token { token, deadlines },
                            reexchanged_at,
                        )
                    }
                }
                Err(Attempt::Gated(retry_after)) => {
                    return Err(TokenUnavailable::new(TokenError::Throttled, retry_after));
                }
                Err(Attempt::Failed(error)) => match error.class() {
                    ErrorClass::Throttled => {
                        exchanges(name, "throttled");
                        let pause = this.close_gate(now);
                        return Err(TokenUnavailable::new(error, pause));
                    }
                    ErrorClass::Fatal => {
                        exchanges(name, "refused");
                        tracing::debug!(source = %name, kind = error.kind_name(), "caller's token refused; remembered");
                        this.refused(key, error, now)
                    }
                    ErrorClass::Transient | ErrorClass::Pending => {
                        exchanges(name, "failed");
                        tracing::warn!(source = %name, kind = error.kind_name(), error = %error, "exchange of a caller's token failed");
                        return Err(TokenUnavailable::new(error, TRANSIENT_RETRY_AFTER));
                    }
                },
            };
            this.set_entries_gauge();
            Ok(entry)
        }
    }

    fn refused(&self, key: CallerKey, error: TokenError, now: Instant) -> Arc<Entry> {
        let ttl = self.inner.options.failure_ttl;
        Entry::new(
            key,
            EntryState::Refused {
                error: TokenUnavailable::new(error, ttl),
                until: now + ttl,
            },
        )
    }

    /// One exchange within the concurrency bound, unless the gate is shut.
    async fn exchange_once(&self, inbound: Secret) -> Result<Token, Attempt> {
        self.gate_open()?;
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|_| Attempt::Gated(TRANSIENT_RETRY_AFTER))?;
        // Throttling may have begun while this one waited for a permit.
        self.gate_open()?;
        let result = self.inner.exchanger.exchange(inbound).await;
        if result.is_ok() {
            self.open_gate();
        }
        result.map_err(Attempt::Failed)
    }

    fn gate_open(&self) -> Result<(), Attempt> {
        let gate = self.inner.gate.lock().unwrap_or_else(|e| e.into_inner());
        match gate.until {
            Some(until) if Instant::now() < until => Err(Attempt::Gated(
                until.saturating_duration_since(Instant::now()),
            )),
            _ => Ok(()),
        }
    }

    /// `SlowDown`: no exchange for a pause that doubles while it lasts.
    fn close_gate(&self, now: Instant) -> Duration {
        let mut gate = self.inner.gate.lock().unwrap_or_else(|e| e.into_inner());
        if gate.until.is_some_and(|until| now < until) {
            // Another exchange already closed it.
            return gate.until.map_or(gate.pause, |u| u - now);
        }
        gate.pause = if gate.pause.is_zero() {
            FIRST_THROTTLE_PAUSE
        } else {
            (gate.pause * 2).min(MAX_THROTTLE_PAUSE)
        };
        gate.until = Some(now + gate.pause);
        tracing::warn!(source = %self.inner.options.name, pause_ms = gate.pause.as_millis() as u64, "AWS is throttling exchanges; pausing them");
        gate.pause
    }

    fn open_gate(&self) {
        let mut gate = self.inner.gate.lock().unwrap_or_else(|e| e.into_inner());
        if gate.until.is_some_and(|until| Instant::now() >= until) {
            *gate = ThrottleGate::default();
        }
    }

    fn deadlines(&self, token: &Token) -> Deadlines {
        Deadlines::new(
            token,
            self.inner.options.expiry_margin,
            self.inner.options.refresh_before_expiry,
        )
    }

    /// One background exchange for an active caller; on failure the
    /// current token stays until it is no longer usable.
    fn refresh_ahead(&self, key: CallerKey, inbound: Secret) {
        let this = self.clone();
        tokio::spawn(async move {
            let name = &this.inner.options.name;
            match this.exchange_once(inbound).await {
                Ok(token) => {
                    let token = Arc::new(token);
                    let deadlines = this.deadlines(&token);
                    if deadlines.usable_on_arrival(&token, Instant::now()) {
                        exchanges(name, "refresh_ok");
                        let entry = Entry::new(key, EntryState::Token { token, deadlines });
                        this.inner.entries.insert(key, entry).await;
                    } else {
                        exchanges(name, "refresh_failed");
                    }
                }
                Err(Attempt::Gated(_)) => exchanges(name, "refresh_failed"),
                Err(Attempt::Failed(error)) => {
                    exchanges(name, "refresh_failed");
                    if error.class() == ErrorClass::Throttled {
                        this.close_gate(Instant::now());
                    }
                    tracing::debug!(source = %name, kind = error.kind_name(), "refresh-ahead of a caller's token failed; serving the current one");
                }
            }
        });
    }

    /// Drops `entry` if it is still the one held for `key`.
    async fn remove_if_holds(&self, key: CallerKey, entry: &Arc<Entry>) {
        self.inner
            .entries
            .entry(key)
            .and_compute_with(|held| {
                let op = match held {
                    Some(h) if Arc::ptr_eq(h.value(), entry) => Op::Remove,
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
    }
}

/// What an upstream `401` of a caller's token led to
/// ([`CallerTokens::reexchange`]).
#[derive(Debug)]
#[non_exhaustive]
pub enum Reexchange {
    /// Another token of that caller's, to replay the request with.
    Replay(Arc<Token>),
    /// That caller's token was already exchanged again for a `401` within
    /// the last minute: the token is kept, the `401` goes back unchanged.
    Limited,
    /// The new exchange was refused or failed.
    Unavailable(TokenUnavailable),
}

/// Why an exchange was not made or did not succeed.
enum Attempt {
    /// The throttle gate is shut for this long.
    Gated(Duration),
    Failed(TokenError),
}

fn exchanges(source: &str, outcome: &'static str) {
    metrics::counter!(CALLER_EXCHANGES_TOTAL.name, "source" => source.to_owned(), "outcome" => outcome)
        .increment(1);
}

/// Lookup counters, registered once: the hit path allocates no labels.
struct LookupCounters {
    hit: metrics::Counter,
    miss: metrics::Counter,
    refused: metrics::Counter,
    gated: metrics::Counter,
}

impl LookupCounters {
    fn new(source: &str) -> Self {
        let counter = |result: &'static str| metrics::counter!(CALLER_CACHE_LOOKUPS_TOTAL.name, "source" => source.to_owned(), "result" => result);
        Self {
            hit: counter("hit"),
            miss: counter("miss"),
            refused: counter("refused"),
            gated: counter("gated"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::atomic::{AtomicU64, Ordering},
    };

    use super::*;
    use crate::oidc::{OidcError, Operation, ServiceErrorKind};

    /// Exchanges `caller-N` for `exchanged:caller-N`; inbound tokens that
    /// start with a scripted prefix fail with its error kind.
    #[derive(Default)]
    struct Counting {
        calls: AtomicU64,
        by_caller: Mutex<HashMap<String, u64>>,
        failing: Mutex<Vec<(String, ServiceErrorKind)>>,
        lifetime: Mutex<Option<Duration>>,
        delay: Duration,
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Counting>);

    impl Shared {
        fn with_delay(delay: Duration) -> Self {
            Self(Arc::new(Counting {
                delay,
                ..Default::default()
            }))
        }
        fn calls(&self) -> u64 {
            self.0.calls.load(Ordering::SeqCst)
        }
        fn calls_for(&self, caller: &str) -> u64 {
            self.0
                .by_caller
                .lock()
                .unwrap()
                .get(caller)
                .copied()
                .unwrap_or(0)
        }
        fn fail(&self, prefix: &str, kind: ServiceErrorKind) {
            self.0
                .failing
                .lock()
                .unwrap()
                .push((prefix.to_owned(), kind));
        }
    }

    impl CallerExchange for Shared {
        fn exchange(&self, inbound: Secret) -> FetchFuture<'_> {
            Box::pin(async move {
                let caller = inbound.expose().to_owned();
                self.0.calls.fetch_add(1, Ordering::SeqCst);
                let n = {
                    let mut by_caller = self.0.by_caller.lock().unwrap();
                    let n = by_caller.entry(caller.clone()).or_default();
                    *n += 1;
                    *n
                };
                if !self.0.delay.is_zero() {
                    tokio::time::sleep(self.0.delay).await;
                }
                let failing = self.0.failing.lock().unwrap().clone();
                if let Some((_, kind)) = failing.iter().find(|(p, _)| caller.starts_with(p)) {
                    return Err(TokenError::Oidc(OidcError::Service {
                        operation: Operation::CreateTokenWithIam,
                        kind: *kind,
                        details: Box::default(),
                    }));
                }
                let lifetime = self
                    .0
                    .lifetime
                    .lock()
                    .unwrap()
                    .unwrap_or(Duration::from_secs(3600));
                Ok(Token::new(
                    Secret::new(format!("exchanged:{caller}#{n}")),
                    lifetime,
                ))
            })
        }
    }

    fn is_for(token: &Token, caller: &str) -> bool {
        token
            .access_token()
            .expose()
            .starts_with(&format!("exchanged:{caller}#"))
    }

    fn cache(exchanger: &Shared, options: CallerOptions) -> CallerTokens {
        CallerTokens::new(exchanger.clone(), options)
    }

    #[tokio::test(start_paused = true)]
    async fn a_hundred_concurrent_requests_of_one_caller_make_one_exchange() {
        let exchanger = Shared::with_delay(Duration::from_millis(50));
        let callers = cache(&exchanger, CallerOptions::default());
        let tasks: Vec<_> = (0..100)
            .map(|_| tokio::spawn(callers.get(Secret::new("caller-1"))))
            .collect();
        for task in tasks {
            let token = task.await.unwrap().unwrap();
            assert_eq!(token.access_token().expose(), "exchanged:caller-1#1");
        }
        assert_eq!(exchanger.calls(), 1);
        // And a later request is a hit.
        callers.get(Secret::new("caller-1")).await.unwrap();
        assert_eq!(exchanger.calls(), 1);
    }

    #[tokio::test]
    async fn a_hundred_thousand_callers_stay_within_max_callers_and_apart() {
        let exchanger = Shared::default();
        let callers = cache(
            &exchanger,
            CallerOptions {
                max_callers: 10_000,
                ..Default::default()
            },
        );
        let rss_before = rss_kib();
        for i in 0..100_000u32 {
            let caller = format!("caller-{i}");
            let token = callers.get(Secret::new(caller.clone())).await.unwrap();
            assert!(is_for(&token, &caller));
            // Callers seen earlier, evicted or not, get their own token.
            if i % 97 == 0 {
                let earlier = format!("caller-{}", i / 3);
                let token = callers.get(Secret::new(earlier.clone())).await.unwrap();
                assert!(is_for(&token, &earlier));
            }
        }
        callers.run_pending_tasks().await;
        let held = callers.entry_count();
        assert!(held <= 10_000, "{held} callers held");
        assert!(held > 0);
        // For BENCHMARKS.md (`--nocapture`); memory, not time, so a shared
        // machine does not distort it.
        if let (Some(before), Some(after)) = (rss_before, rss_kib()) {
            eprintln!("RSS {before} KiB before, {after} KiB after 100,000 callers ({held} held)");
        }
    }

    /// The process's resident set (Linux), in KiB.
    fn rss_kib() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_caller_is_remembered_for_the_failure_ttl() {
        let exchanger = Shared::default();
        exchanger.fail("expired", ServiceErrorKind::InvalidGrant);
        let ttl = Duration::from_secs(30);
        let callers = cache(
            &exchanger,
            CallerOptions {
                failure_ttl: ttl,
                ..Default::default()
            },
        );
        for _ in 0..50 {
            let e = callers.get(Secret::new("expired-jwt")).await.unwrap_err();
            assert_eq!(e.kind(), "InvalidGrant");
            assert!(e.retry_after <= ttl);
        }
        assert_eq!(exchanger.calls(), 1);
        // Other callers are not affected.
        callers.get(Secret::new("caller-2")).await.unwrap();
        tokio::time::advance(ttl + Duration::from_secs(1)).await;
        callers.get(Secret::new("expired-jwt")).await.unwrap_err();
        assert_eq!(exchanger.calls_for("expired-jwt"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_active_caller_is_refreshed_ahead_and_a_failed_refresh_keeps_its_token() {
        let exchanger = Shared::default();
        *exchanger.0.lifetime.lock().unwrap() = Some(Duration::from_secs(60));
        // Window 30 s (half the life), margin 10 s.
        let callers = cache(&exchanger, CallerOptions::default());
        let first = callers.get(Secret::new("caller-1")).await.unwrap();
        tokio::time::advance(Duration::from_secs(31)).await;
        let during = callers.get(Secret::new("caller-1")).await.unwrap();
        assert_eq!(
            during.id(),
            first.id(),
            "the current token while refreshing"
        );
        while exchanger.calls() < 2 {
            tokio::task::yield_now().await;
        }
        let mut refreshed = callers.get(Secret::new("caller-1")).await.unwrap();
        while refreshed.id() == first.id() {
            tokio::task::yield_now().await;
            refreshed = callers.get(Secret::new("caller-1")).await.unwrap();
        }
        assert!(refreshed.expires_at() > first.expires_at());

        // The caller's inbound token has expired by the next refresh: the
        // refresh fails, the current token is served while usable.
        exchanger.fail("caller-1", ServiceErrorKind::InvalidGrant);
        tokio::time::advance(Duration::from_secs(31)).await;
        let kept = callers.get(Secret::new("caller-1")).await.unwrap();
        assert_eq!(kept.id(), refreshed.id());
        while exchanger.calls() < 3 {
            tokio::task::yield_now().await;
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
            let kept = callers.get(Secret::new("caller-1")).await.unwrap();
            assert_eq!(kept.id(), refreshed.id());
        }
        assert_eq!(exchanger.calls(), 3, "one refresh per token");
        // Past its margin the token is gone and the refusal is the answer.
        tokio::time::advance(Duration::from_secs(20)).await;
        let e = callers.get(Secret::new("caller-1")).await.unwrap_err();
        assert_eq!(e.kind(), "InvalidGrant");
    }

    fn replayed(outcome: Reexchange) -> Arc<Token> {
        match outcome {
            Reexchange::Replay(token) => token,
            other => panic!("expected a token to replay with, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_token_is_exchanged_again_at_most_once_a_minute_per_caller() {
        let exchanger = Shared::default();
        let callers = cache(&exchanger, CallerOptions::default());
        let inbound = || Secret::new("caller-1");
        let first = callers.get(inbound()).await.unwrap();
        let second = replayed(callers.reexchange(inbound(), Arc::clone(&first)).await);
        assert_ne!(second.id(), first.id());
        assert!(is_for(&second, "caller-1"));
        assert_eq!(exchanger.calls(), 2);
        // The old token rejected again (a request that was in flight): the
        // new one, no exchange.
        let again = replayed(callers.reexchange(inbound(), Arc::clone(&first)).await);
        assert_eq!(again.id(), second.id());
        // The new token rejected within the minute: kept, the 401 goes back.
        for _ in 0..20 {
            let outcome = callers.reexchange(inbound(), Arc::clone(&second)).await;
            assert!(matches!(outcome, Reexchange::Limited), "{outcome:?}");
        }
        assert_eq!(callers.get(inbound()).await.unwrap().id(), second.id());
        assert_eq!(exchanger.calls(), 2);
        // A minute later, once more.
        tokio::time::advance(FORCED_REFRESH_WINDOW).await;
        let third = replayed(callers.reexchange(inbound(), Arc::clone(&second)).await);
        assert_ne!(third.id(), second.id());
        assert_eq!(exchanger.calls_for("caller-1"), 3);

        // Concurrent rejections of one token: one exchange, one new token.
        let other = callers.get(Secret::new("caller-2")).await.unwrap();
        let tasks: Vec<_> = (0..10)
            .map(|_| tokio::spawn(callers.reexchange(Secret::new("caller-2"), Arc::clone(&other))))
            .collect();
        let mut ids = std::collections::HashSet::new();
        for task in tasks {
            let token = replayed(task.await.unwrap());
            assert!(is_for(&token, "caller-2"));
            ids.insert(token.id());
        }
        assert_eq!(ids.len(), 1);
        assert!(!ids.contains(&other.id()));
        assert_eq!(exchanger.calls_for("caller-2"), 2);
        // Caller 1 was not touched by caller 2's rejections.
        assert_eq!(callers.get(inbound()).await.unwrap().id(), third.id());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_reexchange_is_the_callers_answer_and_remembered() {
        let exchanger = Shared::default();
        let callers = cache(&exchanger, CallerOptions::default());
        let first = callers.get(Secret::new("caller-1")).await.unwrap();
        // The caller's JWT has expired since.
        exchanger.fail("caller-1", ServiceErrorKind::InvalidGrant);
        let outcome = callers.reexchange(Secret::new("caller-1"), first).await;
        match outcome {
            Reexchange::Unavailable(e) => assert_eq!(e.kind(), "InvalidGrant"),
            other => panic!("{other:?}"),
        }
        for _ in 0..5 {
            let e = callers.get(Secret::new("caller-1")).await.unwrap_err();
            assert_eq!(e.kind(), "InvalidGrant");
        }
        assert_eq!(exchanger.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_down_pauses_every_exchange_of_the_replica() {
        let exchanger = Shared::default();
        exchanger.fail("", ServiceErrorKind::SlowDown);
        let callers = cache(&exchanger, CallerOptions::default());
        let e = callers.get(Secret::new("caller-1")).await.unwrap_err();
        assert_eq!(e.class(), ErrorClass::Throttled);
        assert_eq!(e.retry_after, FIRST_THROTTLE_PAUSE);
        // Other callers wait for the pause without an exchange.
        for i in 2..20 {
            let e = callers
                .get(Secret::new(format!("caller-{i}")))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), "Throttled");
        }
        assert_eq!(exchanger.calls(), 1);
        tokio::time::advance(FIRST_THROTTLE_PAUSE).await;
        callers.get(Secret::new("caller-2")).await.unwrap_err();
        assert_eq!(exchanger.calls(), 2);
        // Still throttling: the pause doubles.
        let e = callers.get(Secret::new("caller-3")).await.unwrap_err();
        assert_eq!(e.retry_after, FIRST_THROTTLE_PAUSE * 2);
        assert_eq!(exchanger.calls(), 2);
        // Throttling is not remembered per caller.
        exchanger.0.failing.lock().unwrap().clear();
        tokio::time::advance(FIRST_THROTTLE_PAUSE * 2).await;
        callers.get(Secret::new("caller-1")).await.unwrap();
        callers.get(Secret::new("caller-3")).await.unwrap();
    }

    #[tokio::test]
    async fn inbound_tokens_are_not_kept_or_shown() {
        let exchanger = Shared::default();
        let callers = cache(&exchanger, CallerOptions::default());
        callers.get(Secret::new("S3CRET-inbound")).await.unwrap();
        let shown = format!("{callers:?}");
        assert!(!shown.contains("S3CRET"), "{shown}");
        assert_eq!(caller_key(&Secret::new("a")).len(), 32);
        assert_ne!(caller_key(&Secret::new("a")), caller_key(&Secret::new("b")));
    }
}
