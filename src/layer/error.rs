//! What can go wrong in [`BearerTokenService`](super::BearerTokenService),
//! and the `503` answer for a missing token.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;
use tower::BoxError;

use crate::cache::TokenUnavailable;

/// Error of a [`BearerTokenService`](super::BearerTokenService): either no
/// token could be had, or the inner service failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BearerTokenError<E> {
    /// No valid token could be had; the request was not sent (or, after a
    /// `401`, not replayed). Answer it with [`unavailable_response`].
    #[error("no bearer token for the request")]
    Token(#[source] TokenUnavailable),
    /// The inner service failed.
    #[error("the wrapped service failed")]
    Inner(#[source] E),
}

impl<E> BearerTokenError<E> {
    /// The token failure, if that is what this is.
    pub fn token_unavailable(&self) -> Option<&TokenUnavailable> {
        match self {
            Self::Token(e) => Some(e),
            Self::Inner(_) => None,
        }
    }

    /// The inner service's error, if that is what this is.
    pub fn inner(&self) -> Option<&E> {
        match self {
            Self::Inner(e) => Some(e),
            Self::Token(_) => None,
        }
    }

    /// Boxes the error for a `BoxError` boundary: a token failure becomes
    /// the boxed [`TokenUnavailable`] (recover it with `downcast_ref`), an
    /// inner error is boxed as it is.
    pub fn into_boxed(self) -> BoxError
    where
        E: Into<BoxError>,
    {
        match self {
            Self::Token(e) => Box::new(e),
            Self::Inner(e) => e.into(),
        }
    }

    /// The inner service's error, or `Err(self)` for a token failure.
    pub fn into_inner(self) -> Result<E, Self> {
        match self {
            Self::Inner(e) => Ok(e),
            other => Err(other),
        }
    }
}

#[derive(Serialize)]
struct UnavailableBody<'a> {
    error: &'a str,
    kind: &'a str,
    message: String,
}

/// The answer to a request that could not get a token: `503 Service
/// Unavailable`, `content-type: application/json`, `Retry-After` in whole
/// seconds (rounded up, at least 1) and a body like
/// `{"error":"token_unavailable","kind":"InvalidGrant","message":"..."}`.
///
/// The message is the error's `Display`, which never holds a secret.
pub fn unavailable_response<B: From<Bytes>>(err: &TokenUnavailable) -> Response<B> {
    let body = UnavailableBody {
        error: "token_unavailable",
        kind: err.kind(),
        message: err.to_string(),
    };
    // Serialising three strings cannot fail.
    let json = serde_json::to_vec(&body).unwrap_or_default();
    let mut response = Response::new(B::from(Bytes::from(json)));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::RETRY_AFTER,
        HeaderValue::from(retry_after_secs(err.retry_after)),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Whole seconds, rounded up, never 0 (`Retry-After: 0` invites a storm).
fn retry_after_secs(delay: Duration) -> u64 {
    let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_at_least_one_second() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::from_secs(30)), 30);
    }
}
