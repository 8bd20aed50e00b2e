//! [`SharedStoreSource`]: a [`RefreshTokenSource`] whose tokens live in
//! Redis, so that replicas sharing one client and refresh token take turns
//! refreshing instead of revoking each other's refresh tokens.

use std::{
    fmt,
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use super::redis::{Commit, Fence, NewTokens, RedisStore, StoreError, StoreKeys, TokenRecord};
use crate::{
    cache::scaled_expiry_margin,
    metric_names,
    oidc::ServiceErrorKind,
    secret::Secret,
    token::{
        CredentialUpdate, FetchFuture, PersistStatus, RefreshTokenSource, ReloadFuture, Reuse,
        StateFile, Token, TokenError, TokenSource,
    },
};

/// How a [`SharedStoreSource`] coordinates.
#[derive(Debug, Clone)]
pub struct SharedStoreOptions {
    /// Prepended to every key (`store.key_prefix`).
    pub key_prefix: String,
    /// Time to live of the refresh lock; a replica that dies holding it is
    /// replaced after this. The holder renews it while it refreshes.
    pub lock_lease: Duration,
    /// How long a replica waits for the lock holder's new token.
    pub wait_timeout: Duration,
    /// Refresh with the local refresh token when Redis is unreachable.
    pub refresh_without_store: bool,
    /// A stored token with less than this left is never handed out (the
    /// cache's `expiry_margin`, scaled like the cache scales it: at most a
    /// quarter of the token's lifetime).
    pub expiry_margin: Duration,
    /// How often Redis is pinged for the `store_up` gauge and to publish a
    /// token refreshed while it was down.
    pub health_interval: Duration,
}

impl Default for SharedStoreOptions {
    fn default() -> Self {
        Self {
            key_prefix: "sso-token-proxy:".to_owned(),
            lock_lease: Duration::from_secs(15),
            wait_timeout: Duration::from_secs(10),
            refresh_without_store: false,
            expiry_margin: Duration::from_secs(10),
            health_interval: Duration::from_secs(1),
        }
    }
}

/// The token this replica last handed out.
struct HandedOut {
    /// Generation of the record it came from; `None` when it is not (yet)
    /// in Redis.
    generation: Option<u64>,
    token: Token,
}

/// A refresh made while Redis was unreachable, published once it is back
/// if nobody else refreshed meanwhile.
struct Pending {
    base_generation: u64,
    token: Token,
    refresh_token: Secret,
}

struct State {
    held: Option<HandedOut>,
    /// The refresh token the inner source holds, and the generation it
    /// came from (0: configured or state file).
    known_refresh_token: Option<(Secret, u64)>,
    pending: Option<Pending>,
}

struct Inner {
    refresh: RefreshTokenSource,
    store: RedisStore,
    keys: StoreKeys,
    owner: String,
    identity: String,
    client_id: String,
    configured_refresh_token: Secret,
    options: SharedStoreOptions,
    state: tokio::sync::Mutex<State>,
    up: AtomicBool,
    degraded: AtomicBool,
    /// Bumped whenever `held` gets a new token.
    held_serial: AtomicU64,
}

/// A [`TokenSource`] that shares the access token, its expiry and the newest
/// refresh token with other replicas through Redis.
///
/// On a fetch it hands out the stored access token when it is good enough.
/// Otherwise one replica takes the refresh lock (`SET NX PX` with a fencing
/// number), refreshes with the stored refresh token, writes the result back
/// while still holding the lock, and releases it (compare-and-delete); the
/// others wait for the new record. When Redis cannot be reached a replica
/// keeps its valid token and, unless told otherwise, refuses to refresh a
/// refresh token that other replicas share.
#[derive(Clone)]
pub struct SharedStoreSource {
    inner: Arc<Inner>,
}

impl fmt::Debug for SharedStoreSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedStoreSource")
            .field("store", &self.inner.store)
            .field("keys", &self.inner.keys)
            .field("client_id", &self.inner.client_id)
            .field("owner", &self.inner.owner)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

/// Aborts the lease renewal when the refresh ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn store_error_metric(e: &StoreError) {
    metrics::counter!(metric_names::STORE_ERRORS_TOTAL.name, "op" => e.op()).increment(1);
}

impl SharedStoreSource {
    /// Wraps `refresh`. `client_id` and `configured_refresh_token` are those
    /// `refresh` was built with (the configured token seeds Redis when it
    /// has no record yet). Must be called inside a Tokio runtime: it starts
    /// a health task that ends when the source is dropped.
    pub fn new(
        refresh: RefreshTokenSource,
        store: RedisStore,
        client_id: impl Into<String>,
        configured_refresh_token: Secret,
        options: SharedStoreOptions,
    ) -> Self {
        let identity = refresh.identity();
        let keys = StoreKeys::new(&options.key_prefix, &identity);
        let owner = format!("{}:{:08x}", std::process::id(), rand::random::<u32>());
        let inner = Arc::new(Inner {
            refresh,
            store,
            keys,
            owner,
            identity,
            client_id: client_id.into(),
            configured_refresh_token,
            options,
            state: tokio::sync::Mutex::new(State {
                held: None,
                known_refresh_token: None,
                pending: None,
            }),
            up: AtomicBool::new(true),
            degraded: AtomicBool::new(false),
            held_serial: AtomicU64::new(0),
        });
        metrics::gauge!(metric_names::STORE_UP.name).set(1.0);
        metrics::gauge!(metric_names::STORE_DEGRADED.name).set(0.0);
        tokio::spawn(health_loop(Arc::downgrade(&inner)));
        Self { inner }
    }

    /// The keys this source uses.
    pub fn keys(&self) -> &StoreKeys {
        &self.inner.keys
    }

    /// `PID:RANDOM`: how this replica appears in lock values and records.
    pub fn owner(&self) -> &str {
        &self.inner.owner
    }

    /// Whether the last contact with Redis succeeded.
    pub fn store_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }

    /// The store and the keys of this source's tokens (a device login
    /// keeps its lock and prompt next to them).
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    pub(crate) fn store(&self) -> &RedisStore {
        &self.inner.store
    }

    /// The generation of the shared record (0: none yet).
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    pub(crate) async fn generation(&self) -> Result<u64, StoreError> {
        Ok(self
            .inner
            .store
            .read(&self.inner.keys)
            .await?
            .map_or(0, |r| r.generation))
    }

    /// Stores the tokens a device login obtained as the next record, and
    /// takes them as this replica's: the other replicas adopt them from
    /// Redis. Written without the refresh lock (the login lock stood for
    /// it) unless someone wrote a newer record since `base_generation`.
    #[cfg_attr(not(feature = "proxy"), allow(dead_code))]
    pub(crate) async fn store_login(
        &self,
        base_generation: u64,
        token: &Token,
        refresh_token: &Secret,
    ) -> Result<(), TokenError> {
        let inner = &*self.inner;
        let mut state = inner.state.lock().await;
        let tokens = NewTokens {
            access_token: token.access_token().clone(),
            expires_at: token.expires_at_wall(),
            refresh_token: refresh_token.clone(),
        };
        match inner
            .store
            .commit(&inner.keys, None, base_generation, &tokens, &inner.owner)
            .await
        {
            Ok(Commit::Locked { generation, .. } | Commit::Unlocked { generation }) => {
                inner.committed(&mut state, generation, token.clone(), refresh_token.clone());
                Ok(())
            }
            Ok(Commit::Conflict { current }) => Err(TokenError::Store(format!(
                "another replica stored tokens (generation {current}) while this one logged in; using those"
            ))),
            Err(e) => {
                inner.store_failed(&e);
                Err(TokenError::Store(e.to_string()))
            }
        }
    }

    /// Whether this replica is refusing or making refreshes without Redis.
    pub fn degraded(&self) -> bool {
        self.inner.degraded.load(Ordering::Relaxed)
    }
}

impl TokenSource for SharedStoreSource {
    fn identity(&self) -> String {
        self.inner.identity.clone()
    }

    fn scopes(&self) -> &[String] {
        self.inner.refresh.scopes()
    }

    fn fetch(&self, reuse: Reuse) -> FetchFuture<'_> {
        Box::pin(self.inner.fetch(reuse))
    }

    fn reload(&self, update: CredentialUpdate) -> ReloadFuture<'_> {
        // A new client secret applies at once; a new configured refresh
        // token only seeds an empty store (the store's token is newer).
        Box::pin(self.inner.refresh.reload(update))
    }

    fn persistence(&self) -> Option<PersistStatus> {
        // The local copy of the shared refresh token, in the state file.
        self.inner.refresh.persistence()
    }
}

async fn health_loop(inner: Weak<Inner>) {
    loop {
        // Only a weak reference across the sleep: the task ends with the
        // source.
        let period = {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            inner.check_health().await;
            inner.options.health_interval.max(Duration::from_millis(50))
        };
        tokio::time::sleep(period).await;
    }
}

// === impl Inner ===

impl Inner {
    async fn check_health(&self) {
        match self.store.ping().await {
            Ok(()) => {
                self.set_up(true);
                // Publish a refresh made while Redis was down; skip when a
                // fetch is running (it does the same).
                if let Ok(mut state) = self.state.try_lock() {
                    self.publish_pending(&mut state).await;
                    if state.pending.is_none() {
                        self.set_degraded(false);
                    }
                }
            }
            Err(e) => {
                store_error_metric(&e);
                if self.up.load(Ordering::Relaxed) {
                    tracing::warn!(error = %e, "shared token store unreachable");
                }
                self.set_up(false);
            }
        }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
        metrics::gauge!(metric_names::STORE_UP.name).set(if up { 1.0 } else { 0.0 });
    }

    fn set_degraded(&self, degraded: bool) {
        let was = self.degraded.swap(degraded, Ordering::Relaxed);
        metrics::gauge!(metric_names::STORE_DEGRADED.name).set(if degraded { 1.0 } else { 0.0 });
        if was && !degraded {
            tracing::info!("shared token store reachable again; refreshes are coordinated");
        }
    }

    fn store_failed(&self, e: &StoreError) {
        store_error_metric(e);
        if e.is_unavailable() {
            self.set_up(false);
        }
    }

    fn hold(&self, state: &mut State, held: HandedOut) {
        if state
            .held
            .as_ref()
            .is_none_or(|h| h.token.id() != held.token.id())
        {
            self.held_serial.fetch_add(1, Ordering::AcqRel);
        }
        state.held = Some(held);
    }

    async fn fetch(&self, reuse: Reuse) -> Result<Token, TokenError> {
        let serial = self.held_serial.load(Ordering::Acquire);
        let mut state = self.state.lock().await;
        // Another fetch of this replica got a new token while this one
        // waited for the mutex: that is the token this one came for.
        if self.held_serial.load(Ordering::Acquire) != serial
            && let Some(held) = &state.held
            && held.token.ttl() > self.margin_for(held.token.lifetime())
        {
            return Ok(held.token.clone());
        }
        // A token this replica holds that satisfies the caller needs no
        // round trip (e.g. while Redis is down and the token is valid).
        if let (Reuse::IfValidFor(min), Some(held)) = (reuse, &state.held)
            && held.token.ttl() >= min
            && held.token.ttl() > self.margin_for(held.token.lifetime())
        {
            return Ok(held.token.clone());
        }
        let record = match self.store.read(&self.keys).await {
            Ok(r) => r,
            Err(e) => return self.without_store(&mut state, reuse, e).await,
        };
        self.set_up(true);
        let record = if state.pending.is_some() {
            self.publish_pending(&mut state).await;
            match self.store.read(&self.keys).await {
                Ok(r) => r,
                Err(e) => return self.without_store(&mut state, reuse, e).await,
            }
        } else {
            record
        };
        if let Some(rec) = &record
            && self.acceptable(&state, rec, reuse)
        {
            return Ok(self.adopt(&mut state, rec).await);
        }

        // Refresh: take the lock, or wait for the replica that has it.
        let deadline = Instant::now() + self.options.wait_timeout;
        let mut delay = Duration::from_millis(20);
        let mut waited = false;
        loop {
            match self
                .store
                .try_lock(&self.keys, &self.owner, self.options.lock_lease)
                .await
            {
                Ok(Some(fence)) => {
                    metrics::counter!(metric_names::STORE_LOCK_ACQUIRED_TOTAL.name).increment(1);
                    if waited {
                        metrics::counter!(metric_names::STORE_LOCK_WAIT_TOTAL.name, "outcome" => "took_over")
                            .increment(1);
                    }
                    return self.refresh_holding(&mut state, fence, reuse).await;
                }
                Ok(None) => {}
                Err(e) => return self.without_store(&mut state, reuse, e).await,
            }
            if !waited {
                tracing::debug!(lock = %self.keys.lock, "another replica is refreshing; waiting for its token");
            }
            waited = true;
            let now = Instant::now();
            if now >= deadline {
                metrics::counter!(metric_names::STORE_LOCK_WAIT_TOTAL.name, "outcome" => "timeout")
                    .increment(1);
                let holder = match self.store.lock_holder(&self.keys).await {
                    Ok(Some(f)) => format!("fence {}", f.number),
                    _ => "unknown".to_owned(),
                };
                return Err(TokenError::Store(format!(
                    "another replica ({holder}) holds the refresh lock {} and no new token appeared within {:?}; will retry",
                    self.keys.lock, self.options.wait_timeout
                )));
            }
            tokio::time::sleep(delay.min(deadline - now)).await;
            delay = (delay * 3 / 2).min(Duration::from_millis(250));
            match self.store.read(&self.keys).await {
                Ok(Some(rec)) if self.acceptable(&state, &rec, reuse) => {
                    metrics::counter!(metric_names::STORE_LOCK_WAIT_TOTAL.name, "outcome" => "adopted").increment(1);
                    return Ok(self.adopt(&mut state, &rec).await);
                }
                Ok(_) => {}
                Err(e) => return self.without_store(&mut state, reuse, e).await,
            }
        }
    }

    /// The expiry margin for a token of `lifetime`, scaled as the cache
    /// scales it.
    fn margin_for(&self, lifetime: Duration) -> Duration {
        scaled_expiry_margin(self.options.expiry_margin, lifetime)
    }

    /// Whether a stored record can be handed out for this request.
    fn acceptable(&self, state: &State, rec: &TokenRecord, reuse: Reuse) -> bool {
        let ttl = rec.ttl();
        if ttl <= self.margin_for(rec.lifetime()) {
            return false;
        }
        let held_generation = state.held.as_ref().and_then(|h| h.generation);
        // A record newer than what this replica holds is somebody's fresh
        // refresh (its lifetime may be shorter than the caller's margin).
        let newer = held_generation.is_none_or(|g| rec.generation > g);
        match reuse {
            Reuse::IfValidFor(min) => ttl >= min || newer,
            // The held token was rejected: only a different one will do.
            Reuse::Never => state.held.is_some() && newer,
        }
    }

    /// Hands out a stored record, and makes its refresh token the one the
    /// inner source (and the local state file) would use without Redis.
    async fn adopt(&self, state: &mut State, rec: &TokenRecord) -> Token {
        self.set_degraded(state.pending.is_some());
        if let Some(held) = &state.held
            && held.generation == Some(rec.generation)
        {
            return held.token.clone();
        }
        let token = Token::expiring_at(rec.access_token.clone(), rec.expires_at)
            .issued_at(rec.updated_at)
            .with_scopes(self.refresh.scopes().to_vec());
        metrics::counter!(metric_names::STORE_TOKENS_ADOPTED_TOTAL.name).increment(1);
        tracing::debug!(
            generation = rec.generation,
            ttl_ms = rec.ttl().as_millis() as u64,
            "using the token from the shared store"
        );
        self.learn_refresh_token(state, &rec.refresh_token, rec.generation, Some(&token))
            .await;
        self.hold(
            state,
            HandedOut {
                generation: Some(rec.generation),
                token: token.clone(),
            },
        );
        token
    }

    /// Hands `refresh_token` (with the access token it came with, if any)
    /// to the inner source unless it has it already; the inner source keeps
    /// it in its state file like a rotation of its own.
    async fn learn_refresh_token(
        &self,
        state: &mut State,
        refresh_token: &Secret,
        generation: u64,
        access: Option<&Token>,
    ) {
        if state
            .known_refresh_token
            .as_ref()
            .is_some_and(|(known, _)| known == refresh_token)
        {
            if let Some((_, g)) = &mut state.known_refresh_token {
                *g = generation;
            }
            return;
        }
        self.refresh
            .adopt(refresh_token.clone(), access.cloned())
            .await;
        state.known_refresh_token = Some((refresh_token.clone(), generation));
    }

    /// Refreshes while holding the lock, writes the result to Redis before
    /// handing it out, and releases the lock.
    async fn refresh_holding(
        &self,
        state: &mut State,
        fence: Fence,
        reuse: Reuse,
    ) -> Result<Token, TokenError> {
        let renewal = AbortOnDrop(tokio::spawn(renew_loop(
            self.store.clone(),
            self.keys.clone(),
            fence.clone(),
            self.options.lock_lease,
        )));
        let result = self.refresh_locked(state, &fence, reuse).await;
        drop(renewal);
        match self.store.release(&self.keys, &fence).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                fence = fence.number,
                "the refresh lock's lease ran out before it was released; raise store.lock_lease"
            ),
            Err(e) => {
                // It expires with its lease.
                self.store_failed(&e);
                tracing::warn!(error = %e, "could not release the refresh lock");
            }
        }
        result
    }

    async fn refresh_locked(
        &self,
        state: &mut State,
        fence: &Fence,
        reuse: Reuse,
    ) -> Result<Token, TokenError> {
        // Another replica may have finished a refresh since our last read.
        let record = match self.store.read(&self.keys).await {
            Ok(r) => r,
            Err(e) => return self.without_store(state, reuse, e).await,
        };
        if let Some(rec) = &record
            && self.acceptable(state, rec, reuse)
        {
            return Ok(self.adopt(state, rec).await);
        }
        let base_generation = record.as_ref().map_or(0, |r| r.generation);
        match &record {
            Some(rec) => {
                self.learn_refresh_token(state, &rec.refresh_token, rec.generation, None)
                    .await
            }
            None => tracing::info!(
                key = %self.keys.record,
                "no token in the shared store yet; seeding it from this replica's refresh token"
            ),
        }
        tracing::debug!(
            fence = fence.number,
            generation = base_generation,
            "refreshing as the lock holder"
        );
        let token = match self.refresh.fetch(Reuse::Never).await {
            Ok(t) => t,
            Err(e) => return self.after_failed_refresh(state, base_generation, e).await,
        };
        let newest = self.newest_refresh_token(state, &token, record.as_ref());
        let tokens = NewTokens {
            access_token: token.access_token().clone(),
            expires_at: token.expires_at_wall(),
            refresh_token: newest.clone(),
        };
        // Written before the token is handed out: with rotation the stored
        // refresh token is now revoked.
        match self
            .store
            .commit(
                &self.keys,
                Some(fence),
                base_generation,
                &tokens,
                &self.owner,
            )
            .await
        {
            Ok(Commit::Locked {
                generation,
                replaced,
            }) => {
                if replaced != base_generation {
                    tracing::warn!(
                        generation,
                        replaced,
                        expected = base_generation,
                        "the shared token record changed while this replica held the lock; overwrote it"
                    );
                }
                self.committed(state, generation, token.clone(), newest);
            }
            Ok(Commit::Unlocked { generation }) => {
                tracing::warn!(
                    generation,
                    "the refresh lock's lease ran out during the refresh; the record was unchanged, so the new token was stored anyway"
                );
                self.committed(state, generation, token.clone(), newest);
            }
            Ok(Commit::Conflict { current }) => {
                metrics::counter!(metric_names::STORE_CONFLICTS_TOTAL.name).increment(1);
                tracing::error!(
                    current,
                    expected = base_generation,
                    "lost the refresh lock's lease and another replica stored a newer token meanwhile; \
                     keeping this replica's token locally, the shared record wins (raise store.lock_lease)"
                );
                state.known_refresh_token = Some((newest, 0));
                self.hold(
                    state,
                    HandedOut {
                        generation: None,
                        token: token.clone(),
                    },
                );
            }
            Err(e) => {
                self.store_failed(&e);
                tracing::warn!(
                    error = %e,
                    "could not store the new token in the shared store; it is kept locally and stored when Redis is back"
                );
                self.set_degraded(true);
                self.keep_pending(state, base_generation, 0, &token, newest);
            }
        }
        Ok(token)
    }

    /// Serves `token`, refreshed without the store, from this replica, and
    /// keeps it to be stored once Redis is back (if the record is then still
    /// at `base_generation`). `known_generation` is the generation the new
    /// refresh token is taken to belong to until then.
    fn keep_pending(
        &self,
        state: &mut State,
        base_generation: u64,
        known_generation: u64,
        token: &Token,
        refresh_token: Secret,
    ) {
        state.known_refresh_token = Some((refresh_token.clone(), known_generation));
        state.pending = Some(Pending {
            base_generation,
            token: token.clone(),
            refresh_token,
        });
        self.hold(
            state,
            HandedOut {
                generation: None,
                token: token.clone(),
            },
        );
    }

    fn committed(&self, state: &mut State, generation: u64, token: Token, refresh_token: Secret) {
        tracing::info!(generation, "stored the new token in the shared store");
        state.known_refresh_token = Some((refresh_token, generation));
        self.hold(
            state,
            HandedOut {
                generation: Some(generation),
                token,
            },
        );
        state.pending = None;
        self.set_degraded(false);
    }

    /// The refresh token to store after a refresh: the rotated one, else
    /// the one that was used.
    fn newest_refresh_token(
        &self,
        state: &State,
        token: &Token,
        record: Option<&TokenRecord>,
    ) -> Secret {
        if let Some(rotated) = token.refresh_token().filter(|r| !r.is_empty()) {
            return rotated.clone();
        }
        if let Some(rec) = record {
            return rec.refresh_token.clone();
        }
        if let Some((known, _)) = &state.known_refresh_token {
            return known.clone();
        }
        // Seeding without rotation: the inner source used the state file's
        // token if it had a newer one, else the configured one.
        self.refresh
            .state_file()
            .and_then(|p| StateFile::load(p).ok().flatten())
            .and_then(|s| s.refresh_token)
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| self.configured_refresh_token.clone())
    }

    /// After a refresh failed: an invalid grant may mean that a replica
    /// whose lease ran out stored a newer refresh token meanwhile; use its
    /// token, or its refresh token on the next attempt.
    async fn after_failed_refresh(
        &self,
        state: &mut State,
        base_generation: u64,
        error: TokenError,
    ) -> Result<Token, TokenError> {
        let invalid_grant = matches!(&error, TokenError::Oidc(e) if e.service_kind() == Some(ServiceErrorKind::InvalidGrant));
        if !invalid_grant {
            return Err(error);
        }
        let Ok(Some(rec)) = self.store.read(&self.keys).await else {
            return Err(error);
        };
        if rec.generation == base_generation {
            return Err(error);
        }
        tracing::warn!(
            generation = rec.generation,
            "refresh token rejected, but another replica stored a newer one meanwhile; using it"
        );
        if rec.ttl() > self.margin_for(rec.lifetime()) {
            return Ok(self.adopt(state, &rec).await);
        }
        self.learn_refresh_token(state, &rec.refresh_token, rec.generation, None)
            .await;
        Err(TokenError::Store(
            "the refresh token was rotated by another replica during this refresh; the next attempt uses the newer one"
                .to_owned(),
        ))
    }

    /// Redis could not be used for this fetch.
    async fn without_store(
        &self,
        state: &mut State,
        reuse: Reuse,
        error: StoreError,
    ) -> Result<Token, TokenError> {
        self.store_failed(&error);
        if !error.is_unavailable() {
            return Err(TokenError::Store(error.to_string()));
        }
        self.set_degraded(true);
        if !self.options.refresh_without_store {
            metrics::counter!(metric_names::STORE_REFRESHES_REFUSED_TOTAL.name).increment(1);
            tracing::warn!(
                error = %error,
                "shared token store unavailable; not refreshing the shared refresh token without coordination \
                 (store.refresh_without_store = false); a valid token is still used"
            );
            return Err(TokenError::Store(format!(
                "shared store unavailable ({error}); not refreshing a rotating refresh token without coordination"
            )));
        }
        metrics::counter!(metric_names::STORE_UNCOORDINATED_REFRESHES_TOTAL.name).increment(1);
        tracing::warn!(
            error = %error,
            "shared token store unavailable; refreshing with this replica's refresh token \
             (store.refresh_without_store = true): with rotation, other replicas' refresh token is now revoked"
        );
        let base_generation = match &state.pending {
            Some(p) => p.base_generation,
            None => state.known_refresh_token.as_ref().map_or(0, |(_, g)| *g),
        };
        let token = self.refresh.fetch(reuse).await?;
        let newest = self.newest_refresh_token(state, &token, None);
        self.keep_pending(state, base_generation, base_generation, &token, newest);
        Ok(token)
    }

    /// Stores a token refreshed while Redis was down, if the record is
    /// still the one that refresh started from.
    async fn publish_pending(&self, state: &mut State) {
        let Some(pending) = state.pending.take() else {
            return;
        };
        let tokens = NewTokens {
            access_token: pending.token.access_token().clone(),
            expires_at: pending.token.expires_at_wall(),
            refresh_token: pending.refresh_token.clone(),
        };
        match self
            .store
            .commit(
                &self.keys,
                None,
                pending.base_generation,
                &tokens,
                &self.owner,
            )
            .await
        {
            Ok(Commit::Locked { generation, .. } | Commit::Unlocked { generation }) => {
                tracing::info!(
                    generation,
                    "stored the token refreshed while the shared store was unavailable"
                );
                self.committed(state, generation, pending.token, pending.refresh_token);
            }
            Ok(Commit::Conflict { current }) => {
                metrics::counter!(metric_names::STORE_CONFLICTS_TOTAL.name).increment(1);
                tracing::error!(
                    current,
                    base = pending.base_generation,
                    "this replica refreshed while the shared store was unavailable and so did another; \
                     the shared record wins (with rotation one of the two refresh tokens is revoked)"
                );
                self.set_degraded(false);
            }
            Err(e) => {
                self.store_failed(&e);
                state.pending = Some(pending);
            }
        }
    }
}

/// Extends the lease every third of it while the refresh runs.
async fn renew_loop(store: RedisStore, keys: StoreKeys, fence: Fence, lease: Duration) {
    let period = (lease / 3).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(period).await;
        match store.renew(&keys, &fence, lease).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    fence = fence.number,
                    "lost the refresh lock (its lease ran out)"
                );
                return;
            }
            Err(e) => store_error_metric(&e),
        }
    }
}
