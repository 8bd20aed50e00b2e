//! [`BearerTokenLayer`] and [`BearerTokenService`].

use std::{
    any::Any,
    fmt,
    sync::Arc,
    task::{Context, Poll},
};

use arc_swap::ArcSwapOption;
use http::{HeaderName, HeaderValue, Request, Response, header::AUTHORIZATION};
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::{Instrument, field::Empty};

use super::{
    ReplayableBody, TokenFormat, TokenProvider,
    error::BearerTokenError,
    future::{ResponseFuture, TokenFuture},
    replay::ReplayCopy,
};
use crate::{
    cache::{Lookup, Rejection, TokenCache},
    token::Token,
};

// === impl BearerTokenLayer ===

/// Applies [`BearerTokenService`]: puts a token from a [`TokenProvider`]
/// (by default a [`TokenCache`]) on every request.
#[derive(Debug, Clone)]
pub struct BearerTokenLayer<P = TokenCache> {
    config: BearerConfig<P>,
}

impl<P: TokenProvider> BearerTokenLayer<P> {
    /// Sets `Authorization: Bearer <token>` from `provider`, and on a `401`
    /// replays a replayable request once with a fresh token.
    pub fn new(provider: P) -> Self {
        Self {
            config: BearerConfig::new(provider),
        }
    }

    /// Puts the token in this header instead of `Authorization`.
    #[must_use]
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.config.header.name = name;
        self
    }

    /// Writes the value as `<prefix><token>` instead of `Bearer <token>`,
    /// e.g. `HeaderValue::from_static("Token ")`, or an empty value for the
    /// bare token.
    #[must_use]
    pub fn prefix(mut self, prefix: HeaderValue) -> Self {
        self.config
            .header
            .set_format(TokenFormat::with_prefix(&prefix));
        self
    }

    /// Writes the value as `format` says, e.g. `{token}` or
    /// `Token token={token}`, instead of `Bearer {token}`.
    #[must_use]
    pub fn token_format(mut self, format: TokenFormat) -> Self {
        self.config.header.set_format(format);
        self
    }

    /// Whether a request whose body is replayable is sent again, once, with
    /// a fresh token after the upstream answers `401` (default `true`). The
    /// cache decides about the rejected token either way (see
    /// [`TokenCache::reject`]); when its forced-refresh budget is spent the
    /// `401` is handed back without a replay.
    #[must_use]
    pub fn retry_on_unauthorized(mut self, retry: bool) -> Self {
        self.config.retry_on_unauthorized = retry;
        self
    }
}

impl<S, P: TokenProvider> Layer<S> for BearerTokenLayer<P> {
    type Service = BearerTokenService<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        BearerTokenService {
            inner,
            config: Arc::new(self.config.clone()),
        }
    }
}

// === impl BearerTokenService ===

/// Middleware that puts a bearer token from a [`TokenProvider`] (by
/// default a [`TokenCache`]) on every request; see the
/// [module docs](super).
#[derive(Debug, Clone)]
pub struct BearerTokenService<S, P = TokenCache> {
    inner: S,
    config: Arc<BearerConfig<P>>,
}

impl<S, P: TokenProvider> BearerTokenService<S, P> {
    /// Wraps `inner` with the defaults of [`BearerTokenLayer::new`].
    pub fn new(inner: S, provider: P) -> Self {
        BearerTokenLayer::new(provider).layer(inner)
    }

    /// A [`BearerTokenLayer`] over `provider`.
    pub fn layer(provider: P) -> BearerTokenLayer<P> {
        BearerTokenLayer::new(provider)
    }

    /// See [`BearerTokenLayer::header_name`].
    #[must_use]
    pub fn header_name(mut self, name: HeaderName) -> Self {
        Arc::make_mut(&mut self.config).header.name = name;
        self
    }

    /// See [`BearerTokenLayer::prefix`].
    #[must_use]
    pub fn prefix(mut self, prefix: HeaderValue) -> Self {
        Arc::make_mut(&mut self.config)
            .header
            .set_format(TokenFormat::with_prefix(&prefix));
        self
    }

    /// See [`BearerTokenLayer::token_format`].
    #[must_use]
    pub fn token_format(mut self, format: TokenFormat) -> Self {
        Arc::make_mut(&mut self.config).header.set_format(format);
        self
    }

    /// See [`BearerTokenLayer::retry_on_unauthorized`].
    #[must_use]
    pub fn retry_on_unauthorized(mut self, retry: bool) -> Self {
        Arc::make_mut(&mut self.config).retry_on_unauthorized = retry;
        self
    }

    /// Where the tokens come from.
    pub fn provider(&self) -> &P {
        &self.config.provider
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, P, B, ResB> Service<Request<B>> for BearerTokenService<S, P>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    P: TokenProvider,
    B: ReplayableBody,
{
    type Response = Response<ResB>;
    type Error = BearerTokenError<S::Error>;
    type Future = ResponseFuture<S, B, P>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(BearerTokenError::Inner)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let Some(sent) = self.config.apply_current(&mut request) else {
            return self.call_after_fetch(request);
        };
        let replay = if self.config.retry_on_unauthorized {
            ReplayCopy::of(&request)
        } else {
            None
        };
        // A replay needs a service of its own, polled ready before its call.
        let retry_service = replay.as_ref().map(|_| self.inner.clone());
        let future = self.inner.call(request);
        ResponseFuture::called(
            future,
            sent,
            replay,
            retry_service,
            Arc::clone(&self.config),
        )
    }
}

impl<S, P: TokenProvider> BearerTokenService<S, P> {
    /// Miss path: the call waits for the token, so the service that was
    /// polled ready moves into the future and a fresh clone stays here.
    fn call_after_fetch<B, ResB>(&mut self, request: Request<B>) -> ResponseFuture<S, B, P>
    where
        S: Service<Request<B>, Response = Response<ResB>> + Clone,
        B: ReplayableBody,
    {
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        let fetch = fetch_token(&self.config.provider, FetchTrigger::Miss);
        ResponseFuture::fetching(fetch, request, ready, Arc::clone(&self.config))
    }
}

/// Why a request waits for a token.
#[derive(Clone, Copy)]
pub(super) enum FetchTrigger {
    /// No valid token in memory.
    Miss,
    /// The upstream answered `401` to the token sent.
    Unauthorized,
}

/// A token from `provider`, in a `token_acquisition` span. Out of line: the
/// provider's future is large, and the frames of the hit path (`call`, the
/// response future's `poll`) would otherwise make room for it on every
/// request.
#[inline(never)]
pub(super) fn fetch_token<P: TokenProvider>(provider: &P, trigger: FetchTrigger) -> TokenFuture {
    let get = provider.get();
    let span = match trigger {
        FetchTrigger::Miss => tracing::debug_span!(
            "token_acquisition",
            cache = "miss",
            outcome = Empty,
            kind = Empty
        ),
        FetchTrigger::Unauthorized => tracing::debug_span!(
            "token_acquisition",
            cache = "miss",
            trigger = "unauthorized",
            outcome = Empty,
            kind = Empty
        ),
    };
    Box::pin(
        async move {
            let result = get.await;
            record_outcome(&result);
            result
        }
        .instrument(span),
    )
}

/// Records the outcome of a fetch on the current `token_acquisition` span.
fn record_outcome<T>(result: &Result<T, crate::cache::TokenUnavailable>) {
    let span = tracing::Span::current();
    match result {
        Ok(_) => {
            span.record("outcome", "ok");
        }
        Err(e) => {
            span.record("outcome", "error");
            span.record("kind", e.kind());
            tracing::debug!(
                kind = e.kind(),
                retry_after_ms = e.retry_after.as_millis() as u64,
                "no token"
            );
        }
    }
}

// === impl BearerConfig ===

/// The token provider and how tokens go on requests; one per layer, shared
/// by its services, their clones and their futures.
#[derive(Debug, Clone)]
pub(super) struct BearerConfig<P> {
    pub(super) provider: P,
    pub(super) header: HeaderSetting,
    pub(super) retry_on_unauthorized: bool,
}

impl<P: TokenProvider> BearerConfig<P> {
    /// Hit path: sets the token to send now on `request` and says which
    /// one it was; `None` when the request must wait for a token.
    fn apply_current<B>(&self, request: &mut Request<B>) -> Option<SentToken> {
        // The crate's own cache answers under its guard, without an `Arc`
        // clone per request; the check is on types, decided at compile time.
        if let Some(cache) = (&self.provider as &dyn Any).downcast_ref::<TokenCache>() {
            return cache.lookup_with(|token, refresh_ahead| {
                self.apply_traced(request, token, refresh_ahead);
                SentToken::Cached {
                    id: token.id(),
                    expires_at: token.expires_at(),
                }
            });
        }
        let (token, refresh_ahead) = match self.provider.lookup() {
            Lookup::Hit(token) => (token, false),
            Lookup::RefreshAhead(token) => (token, true),
            Lookup::Miss => return None,
        };
        self.apply_traced(request, &token, refresh_ahead);
        Some(SentToken::Provided(token))
    }

    fn apply_traced<B>(&self, request: &mut Request<B>, token: &Token, refresh_ahead: bool) {
        // When TRACE is off, not even a disabled span to build and drop.
        if !tracing::level_enabled!(tracing::Level::TRACE) {
            self.header.apply(request, token);
            return;
        }
        let _span = tracing::trace_span!(
            "token_acquisition",
            cache = if refresh_ahead {
                "refresh_ahead"
            } else {
                "hit"
            },
            outcome = "ok",
            token_id = token.id()
        )
        .entered();
        self.header.apply(request, token);
    }

    /// An upstream answered `401` to a request that carried `sent`.
    pub(super) fn reject(&self, sent: &SentToken) -> Rejection {
        match sent {
            SentToken::Cached { id, expires_at } => (&self.provider as &dyn Any)
                .downcast_ref::<TokenCache>()
                .expect("only a TokenCache hands out SentToken::Cached")
                .reject_sent(*id, *expires_at),
            SentToken::Provided(token) => self.provider.reject(token),
        }
    }
}

/// The token a request went out with, for the decision after a `401`.
pub(super) enum SentToken {
    /// From the crate's [`TokenCache`]: its id and expiry are all
    /// [`TokenCache::reject`] needs.
    Cached { id: u64, expires_at: Instant },
    /// From another provider, or fetched on a miss.
    Provided(Arc<Token>),
}

impl SentToken {
    pub(super) fn id(&self) -> u64 {
        match self {
            Self::Cached { id, .. } => *id,
            Self::Provided(token) => token.id(),
        }
    }
}

impl<P> BearerConfig<P> {
    fn new(provider: P) -> Self {
        Self {
            provider,
            header: HeaderSetting {
                name: AUTHORIZATION,
                custom: None,
            },
            retry_on_unauthorized: true,
        }
    }
}

/// Which header carries the token, and how its value is written: the one
/// place a token's header value is built.
#[derive(Debug, Clone)]
pub(super) struct HeaderSetting {
    name: HeaderName,
    /// `None`: the token's own precomputed `Bearer <token>` value.
    custom: Option<CustomFormat>,
}

impl HeaderSetting {
    fn set_format(&mut self, format: TokenFormat) {
        self.custom = (!format.is_bearer()).then(|| CustomFormat {
            format,
            last: Arc::new(ArcSwapOption::empty()),
        });
    }

    /// Sets the header on `request`, replacing every value it had.
    #[inline]
    pub(super) fn apply<B>(&self, request: &mut Request<B>, token: &Token) {
        let value = match &self.custom {
            None => token.header_value().clone(),
            Some(custom) => custom.value(token),
        };
        request.headers_mut().insert(self.name.clone(), value);
    }
}

/// A format other than `Bearer {token}`; the value built for the latest
/// token is kept, so the hit path builds nothing.
#[derive(Clone)]
struct CustomFormat {
    format: TokenFormat,
    last: Arc<ArcSwapOption<(u64, HeaderValue)>>,
}

impl fmt::Debug for CustomFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomFormat")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl CustomFormat {
    fn value(&self, token: &Token) -> HeaderValue {
        if let Some(last) = &*self.last.load()
            && last.0 == token.id()
        {
            return last.1.clone();
        }
        let value = self.format.value(token);
        self.last.store(Some(Arc::new((token.id(), value.clone()))));
        value
    }
}
