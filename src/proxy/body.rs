//! The body of every response the proxy sends; the request's bookkeeping
//! ([`RequestGuard`]) lives exactly as long as it.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::activity::RequestGuard;

/// A response body: the upstream's, streamed through untouched, or a small
/// one the proxy wrote itself (refusals and errors).
#[derive(Debug)]
pub(crate) struct ProxyBody {
    kind: Kind,
    /// Dropped with the body: the request stops counting as in flight once
    /// its response has been sent (or abandoned).
    guard: Option<RequestGuard>,
}

#[derive(Debug)]
enum Kind {
    Upstream(Incoming),
    Full(Option<Bytes>),
}

impl ProxyBody {
    /// The upstream's body.
    pub(crate) fn upstream(body: Incoming) -> Self {
        Self {
            kind: Kind::Upstream(body),
            guard: None,
        }
    }

    /// A body the proxy wrote.
    pub(crate) fn full(data: impl Into<Bytes>) -> Self {
        let data = data.into();
        Self {
            kind: Kind::Full((!data.is_empty()).then_some(data)),
            guard: None,
        }
    }

    pub(super) fn set_guard(&mut self, guard: RequestGuard) {
        self.guard = Some(guard);
    }
}

impl From<Bytes> for ProxyBody {
    fn from(data: Bytes) -> Self {
        Self::full(data)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.kind {
            Kind::Upstream(body) => Pin::new(body).poll_frame(cx),
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream(body) => body.is_end_stream(),
            Kind::Full(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream(body) => body.size_hint(),
            Kind::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    #[tokio::test]
    async fn full_body_reports_exact_size() {
        let body = ProxyBody::full("hello");
        assert_eq!(body.size_hint().exact(), Some(5));
        assert!(!body.is_end_stream());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        assert!(ProxyBody::full(Bytes::new()).is_end_stream());
    }
}
