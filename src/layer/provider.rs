//! [`TokenProvider`]: where [`BearerTokenService`](super::BearerTokenService)
//! gets its tokens.

use std::{future::Future, sync::Arc};

use crate::{
    cache::{Lookup, Rejection, TokenCache, TokenUnavailable},
    token::Token,
};

/// Where [`BearerTokenService`](super::BearerTokenService) gets its tokens.
///
/// [`TokenCache`] is the provider this crate offers (single-flight fetches,
/// refresh-ahead, failure memory, rate-limited forced refreshes); implement
/// this trait to put tokens from somewhere else on requests.
///
/// The layer calls [`lookup`](Self::lookup) for every request and only on a
/// [`Lookup::Miss`] waits for [`get`](Self::get); after an upstream `401` it
/// calls [`reject`](Self::reject) with the token that request carried and
/// replays the request with a token from [`get`](Self::get) when that says
/// [`Rejection::Refresh`].
///
/// # Example
///
/// A provider with one fixed token that never changes:
///
/// ```
/// use std::{future::Future, sync::Arc, time::Duration};
///
/// use sso_token_proxy::{
///     BearerTokenLayer, Lookup, Rejection, Secret, Token, TokenProvider, TokenUnavailable,
/// };
///
/// #[derive(Debug, Clone)]
/// struct Fixed(Arc<Token>);
///
/// impl TokenProvider for Fixed {
///     fn lookup(&self) -> Lookup {
///         Lookup::Hit(Arc::clone(&self.0))
///     }
///
///     fn get(&self) -> impl Future<Output = Result<Arc<Token>, TokenUnavailable>> + Send + 'static {
///         std::future::ready(Ok(Arc::clone(&self.0)))
///     }
///
///     fn reject(&self, _token: &Token) -> Rejection {
///         // Nothing better to offer: hand the 401 back.
///         Rejection::Limited
///     }
/// }
///
/// let token = Token::new(Secret::new("abc123"), Duration::from_secs(3600));
/// let layer = BearerTokenLayer::new(Fixed(Arc::new(token)));
/// # let _ = layer;
/// ```
pub trait TokenProvider: Clone + Send + Sync + 'static {
    /// The token to send now, without waiting: [`Lookup::Hit`] (or
    /// [`Lookup::RefreshAhead`] while a fresher one is being fetched), or
    /// [`Lookup::Miss`] when the request must wait for [`get`](Self::get).
    ///
    /// Called for every request: it should neither block nor allocate.
    fn lookup(&self) -> Lookup;

    /// A valid token, waiting for one to be fetched if need be.
    fn get(&self) -> impl Future<Output = Result<Arc<Token>, TokenUnavailable>> + Send + 'static;

    /// An upstream answered `401` to a request that carried `token`.
    /// [`Rejection::Refresh`]: `token` is no longer handed out and the
    /// request may be replayed with the token [`get`](Self::get) returns;
    /// [`Rejection::Limited`]: the `401` goes back to the caller as it is.
    fn reject(&self, token: &Token) -> Rejection;
}

// === impl TokenCache ===

impl TokenProvider for TokenCache {
    fn lookup(&self) -> Lookup {
        TokenCache::lookup(self)
    }

    fn get(&self) -> impl Future<Output = Result<Arc<Token>, TokenUnavailable>> + Send + 'static {
        let cache = self.clone();
        async move { cache.get().await }
    }

    fn reject(&self, token: &Token) -> Rejection {
        TokenCache::reject(self, token)
    }
}
