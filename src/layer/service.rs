//! [`BearerTokenLayer`] and [`BearerTokenService`].

use std::{
    fmt,
    sync::Arc,
    task::{Context, Poll},
};

use arc_swap::ArcSwapOption;
use http::{HeaderName, HeaderValue, Request, Response, header::AUTHORIZATION};
use tower::{Layer, Service};
use tracing::{Instrument, field::Empty};

use super::{
    ReplayableBody,
    body::with_replay_copy,
    error::BearerTokenError,
    future::{ResponseFuture, TokenFuture},
};
use crate::{
    cache::{Lookup, TokenCache},
    token::Token,
};

/// The prefix [`Token::header_value`] is built with.
const DEFAULT_PREFIX: &str = "Bearer ";

// === impl BearerTokenLayer ===

/// Applies [`BearerTokenService`]: puts a token from a [`TokenCache`] on
/// every request.
#[derive(Debug, Clone)]
pub struct BearerTokenLayer {
    shared: Shared,
}

impl BearerTokenLayer {
    /// Sets `Authorization: Bearer <token>` from `cache`, and on a `401`
    /// replays a replayable request once with a fresh token.
    pub fn new(cache: TokenCache) -> Self {
        Self {
            shared: Shared::new(cache),
        }
    }

    /// Puts the token in this header instead of `Authorization`.
    #[must_use]
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.shared.header.name = name;
        self
    }

    /// Writes the value as `<prefix><token>` instead of `Bearer <token>`.
    ///
    /// # Panics
    ///
    /// When `prefix` is not a valid header value (control characters).
    #[must_use]
    pub fn prefix(mut self, prefix: &str) -> Self {
        self.shared.header.set_prefix(prefix);
        self
    }

    /// Whether a request whose body is replayable is sent again, once, with
    /// a fresh token after the upstream answers `401` (default `true`). The
    /// cache decides about the rejected token either way (see
    /// [`TokenCache::reject`]); when its forced-refresh budget is spent the
    /// `401` is handed back without a replay.
    #[must_use]
    pub fn retry_on_unauthorized(mut self, retry: bool) -> Self {
        self.shared.retry_on_unauthorized = retry;
        self
    }
}

impl<S> Layer<S> for BearerTokenLayer {
    type Service = BearerTokenService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BearerTokenService {
            inner,
            shared: Arc::new(self.shared.clone()),
        }
    }
}

// === impl BearerTokenService ===

/// Middleware that puts a bearer token from a [`TokenCache`] on every
/// request; see the [module docs](super).
#[derive(Debug, Clone)]
pub struct BearerTokenService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> BearerTokenService<S> {
    /// Wraps `inner` with the defaults of [`BearerTokenLayer::new`].
    pub fn new(inner: S, cache: TokenCache) -> Self {
        BearerTokenLayer::new(cache).layer(inner)
    }

    /// A [`BearerTokenLayer`] over `cache`.
    pub fn layer(cache: TokenCache) -> BearerTokenLayer {
        BearerTokenLayer::new(cache)
    }

    /// See [`BearerTokenLayer::header_name`].
    #[must_use]
    pub fn header_name(mut self, name: HeaderName) -> Self {
        Arc::make_mut(&mut self.shared).header.name = name;
        self
    }

    /// See [`BearerTokenLayer::prefix`].
    ///
    /// # Panics
    ///
    /// When `prefix` is not a valid header value (control characters).
    #[must_use]
    pub fn prefix(mut self, prefix: &str) -> Self {
        Arc::make_mut(&mut self.shared).header.set_prefix(prefix);
        self
    }

    /// See [`BearerTokenLayer::retry_on_unauthorized`].
    #[must_use]
    pub fn retry_on_unauthorized(mut self, retry: bool) -> Self {
        Arc::make_mut(&mut self.shared).retry_on_unauthorized = retry;
        self
    }

    /// The token cache.
    pub fn cache(&self) -> &TokenCache {
        &self.shared.cache
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

impl<S, B, ResB> Service<Request<B>> for BearerTokenService<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    B: ReplayableBody,
{
    type Response = Response<ResB>;
    type Error = BearerTokenError<S::Error>;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(BearerTokenError::Inner)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let (token, status) = match self.shared.cache.lookup() {
            Lookup::Hit(token) => (token, "hit"),
            Lookup::RefreshAhead(token) => (token, "refresh_ahead"),
            Lookup::Miss => return self.call_after_fetch(request),
        };
        {
            // Cheap when TRACE is off: a level check, no allocation.
            let _span = tracing::trace_span!(
                "token_acquisition",
                cache = status,
                outcome = "ok",
                token_id = token.id()
            )
            .entered();
            self.shared.header.apply(&mut request, &token);
        }
        let replay;
        (request, replay) = if self.shared.retry_on_unauthorized {
            with_replay_copy(request)
        } else {
            (request, None)
        };
        // A replay needs a service of its own, polled ready before its call.
        let retry_service = replay.as_ref().map(|_| self.inner.clone());
        let future = self.inner.call(request);
        ResponseFuture::called(
            future,
            token,
            replay,
            retry_service,
            Arc::clone(&self.shared),
        )
    }
}

impl<S> BearerTokenService<S> {
    /// Miss path: the call waits for the token, so the service that was
    /// polled ready moves into the future and a fresh clone stays here.
    fn call_after_fetch<B, ResB>(&mut self, request: Request<B>) -> ResponseFuture<S, B>
    where
        S: Service<Request<B>, Response = Response<ResB>> + Clone,
        B: ReplayableBody,
    {
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        let cache = self.shared.cache.clone();
        let span = tracing::debug_span!(
            "token_acquisition",
            cache = "miss",
            outcome = Empty,
            kind = Empty
        );
        let fetch: TokenFuture = Box::pin(
            async move {
                let result = cache.get().await;
                record_outcome(&result);
                result
            }
            .instrument(span),
        );
        ResponseFuture::fetching(fetch, request, ready, Arc::clone(&self.shared))
    }
}

/// Records the outcome of a fetch on the current `token_acquisition` span.
pub(super) fn record_outcome<T>(result: &Result<T, crate::cache::TokenUnavailable>) {
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

// === impl Shared ===

/// Settings and cache shared by a service, its clones and its futures.
#[derive(Debug, Clone)]
pub(super) struct Shared {
    pub(super) cache: TokenCache,
    pub(super) header: HeaderSetting,
    pub(super) retry_on_unauthorized: bool,
}

impl Shared {
    fn new(cache: TokenCache) -> Self {
        Self {
            cache,
            header: HeaderSetting {
                name: AUTHORIZATION,
                custom: None,
            },
            retry_on_unauthorized: true,
        }
    }
}

/// Which header carries the token, and how its value is written.
#[derive(Debug, Clone)]
pub(super) struct HeaderSetting {
    name: HeaderName,
    /// `None`: the token's own precomputed `Bearer <token>` value.
    custom: Option<CustomPrefix>,
}

impl HeaderSetting {
    fn set_prefix(&mut self, prefix: &str) {
        assert!(
            HeaderValue::from_str(prefix).is_ok(),
            "the token prefix must be a valid header value"
        );
        self.custom = (prefix != DEFAULT_PREFIX).then(|| CustomPrefix {
            prefix: prefix.into(),
            last: Arc::new(ArcSwapOption::empty()),
        });
    }

    /// Sets the header on `request`, replacing every value it had.
    pub(super) fn apply<B>(&self, request: &mut Request<B>, token: &Token) {
        let value = match &self.custom {
            None => token.header_value().clone(),
            Some(custom) => custom.value(token),
        };
        request.headers_mut().insert(self.name.clone(), value);
    }
}

/// A non-default prefix; the value built for the latest token is kept.
#[derive(Clone)]
struct CustomPrefix {
    prefix: Arc<str>,
    last: Arc<ArcSwapOption<(u64, HeaderValue)>>,
}

impl fmt::Debug for CustomPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomPrefix")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl CustomPrefix {
    fn value(&self, token: &Token) -> HeaderValue {
        if let Some(last) = &*self.last.load()
            && last.0 == token.id()
        {
            return last.1.clone();
        }
        let text = format!("{}{}", self.prefix, token.access_token().expose());
        // Tokens are checked to fit a header; the prefix was checked above.
        let mut value =
            HeaderValue::try_from(text).unwrap_or_else(|_| token.header_value().clone());
        value.set_sensitive(true);
        self.last.store(Some(Arc::new((token.id(), value.clone()))));
        value
    }
}
