//! The body of every response the proxy sends; the request's bookkeeping
//! ([`RequestGuard`]) lives exactly as long as it.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::{activity::RequestGuard, pool::Lease, stream_watch, upload::UpstreamBody};

/// A response body: the upstream's, streamed through untouched, or a small
/// one the proxy wrote itself (refusals and errors).
#[derive(Debug)]
pub(crate) struct ProxyBody {
    kind: Kind,
    /// Dropped with the body: the request stops counting as in flight once
    /// its response has been sent (or abandoned).
    guard: Option<RequestGuard>,
}

enum Kind {
    /// With the connection it arrives on, while this body is what that
    /// connection is busy with.
    Upstream(Incoming, Option<Lease<UpstreamBody>>),
    Full(Option<Bytes>),
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Upstream(body, lease) => f
                .debug_tuple("Upstream")
                .field(body)
                .field(&lease.is_some())
                .finish(),
            Self::Full(data) => f.debug_tuple("Full").field(data).finish(),
        }
    }
}

impl ProxyBody {
    /// The upstream's body, and the connection to drive while reading it.
    pub(crate) fn upstream(body: Incoming, lease: Option<Lease<UpstreamBody>>) -> Self {
        Self {
            kind: Kind::Upstream(body, lease),
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

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // Not read to its end (the client went, or a `401` is replayed):
        // the connection is finished off elsewhere, or closed.
        if let Kind::Upstream(_, lease) = &mut self.kind
            && let Some(lease) = lease.take()
        {
            lease.release();
        }
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
        let frame = match &mut self.kind {
            Kind::Upstream(body, lease) => {
                if let Some(lease) = lease {
                    lease.drive(cx);
                }
                let frame = Pin::new(&mut *body).poll_frame(cx);
                let ended = match &frame {
                    Poll::Ready(None | Some(Err(_))) => true,
                    Poll::Ready(Some(Ok(_))) => body.is_end_stream(),
                    Poll::Pending => false,
                };
                if ended && let Some(lease) = lease.take() {
                    lease.release();
                }
                frame
            }
            Kind::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        };
        match &frame {
            Poll::Ready(Some(Ok(_))) => stream_watch::answered(),
            Poll::Pending => stream_watch::upstream_pending(),
            Poll::Ready(_) => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream(body, _) => body.is_end_stream(),
            Kind::Full(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream(body, _) => body.size_hint(),
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
