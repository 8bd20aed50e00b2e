//! Middleware that puts a bearer token from a [`TokenCache`] (or any
//! [`TokenProvider`]) on every outbound request.
//!
//! [`BearerTokenService`] sets `Authorization: Bearer <token>` (or another
//! header and [`TokenFormat`]) as a sensitive header value, replacing
//! whatever the request carried under that name.
//!
//! * **Hit path.** With a valid token in memory the header is set and the
//!   inner service called at once: no waiting, no boxing.
//! * **Miss path.** Otherwise the token is fetched through the cache (one
//!   fetch however many requests wait), then the inner service is called. A
//!   failure answers [`BearerTokenError::Token`]; [`unavailable_response`]
//!   turns it into a `503` with `Retry-After`.
//! * **`401`.** The [cache decides](crate::cache::TokenCache::reject): only
//!   the token this very request carried is dropped, each token at most
//!   once, and within a budget of forced refreshes per minute. When the token was
//!   dropped (or already replaced) and the request's body is
//!   [replayable](ReplayableBody) and
//!   [`retry_on_unauthorized`](BearerTokenLayer::retry_on_unauthorized) is on
//!   (the default), the request is sent once more with a fresh token and
//!   that answer is final. Otherwise, and whenever the budget is spent, the
//!   `401` is handed back unchanged. Requests that fail together with the
//!   same old token cause one refresh; an upstream that rejects everything
//!   causes a handful of refreshes a minute, not one per request.
//!
//! Each token acquisition is a `token_acquisition` span with the fields
//! `cache` (`hit`, `refresh_ahead`, `miss`) and `outcome`; hits are traced at
//! `TRACE`, misses at `DEBUG`. The token itself is never logged.
//!
//! # Example
//!
//! ```
//! use std::{convert::Infallible, time::Duration};
//!
//! use bytes::Bytes;
//! use http::{Request, Response, header::AUTHORIZATION};
//! use http_body_util::Full;
//! use sso_token_proxy::{
//!     BearerTokenLayer, CacheOptions, Reuse, Secret, Token, TokenCache, TokenSource,
//!     token::FetchFuture,
//! };
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//!
//! // A source with one fixed token; real code uses `RefreshTokenSource`.
//! struct Fixed;
//!
//! impl TokenSource for Fixed {
//!     fn identity(&self) -> String {
//!         "fixed".into()
//!     }
//!     fn scopes(&self) -> &[String] {
//!         &[]
//!     }
//!     fn fetch(&self, _reuse: Reuse) -> FetchFuture<'_> {
//!         Box::pin(async { Ok(Token::new(Secret::new("abc123"), Duration::from_secs(3600))) })
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let cache = TokenCache::new(Fixed, CacheOptions::default());
//!
//! let client = ServiceBuilder::new()
//!     .layer(BearerTokenLayer::new(cache))
//!     .service(service_fn(|request: Request<Full<Bytes>>| async move {
//!         // The upstream sees the token.
//!         let auth = request.headers()[AUTHORIZATION].to_str().unwrap().to_owned();
//!         Ok::<_, Infallible>(Response::new(auth))
//!     }));
//!
//! let request = Request::get("http://upstream.internal/items")
//!     .header(AUTHORIZATION, "Bearer from-the-caller")
//!     .body(Full::new(Bytes::from_static(b"{}")))?;
//! let response = client.oneshot(request).await?;
//! assert_eq!(response.body(), "Bearer abc123");
//! # Ok(())
//! # }
//! ```

mod body;
mod error;
mod format;
mod future;
mod provider;
mod replay;
mod service;

#[cfg(doc)]
use crate::cache::TokenCache;

#[cfg(feature = "proxy")]
pub(crate) use self::replay::ReplayCopy;
pub use self::{
    body::{ReplayBody, ReplayableBody},
    error::{BearerTokenError, unavailable_response},
    format::{TokenFormat, TokenFormatError},
    future::ResponseFuture,
    provider::TokenProvider,
    service::{BearerTokenLayer, BearerTokenService},
};
