//! Request bodies that can be sent twice, for the replay after a `401`.

use std::{
    mem,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Empty, Full};
use pin_project_lite::pin_project;

/// A request body that may be copied before it is sent, so the request can
/// be replayed once with a fresh token when the upstream answers `401`.
///
/// A body that cannot be copied (a stream) returns `None`; its request is
/// sent once and a `401` is handed back to the caller. In-memory bodies
/// (`Full`, `Empty`, `Bytes`, `String`, `Vec<u8>`, `()`) are replayable;
/// streams (`hyper::body::Incoming`, `axum::body::Body` with the `axum` feature, boxed bodies) are
/// not. [`ReplayBody`] lets one body type be either, per request: collect a
/// small body into [`ReplayBody::buffered`] to make its request replayable.
pub trait ReplayableBody: Sized {
    /// A copy of the whole body, or `None` when it cannot be replayed.
    fn try_clone(&self) -> Option<Self>;
}

impl<D: Buf + Clone> ReplayableBody for Full<D> {
    fn try_clone(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl<D> ReplayableBody for Empty<D> {
    fn try_clone(&self) -> Option<Self> {
        Some(*self)
    }
}

impl ReplayableBody for Bytes {
    fn try_clone(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl ReplayableBody for String {
    fn try_clone(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl ReplayableBody for Vec<u8> {
    fn try_clone(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl ReplayableBody for &'static str {
    fn try_clone(&self) -> Option<Self> {
        Some(self)
    }
}

impl ReplayableBody for &'static [u8] {
    fn try_clone(&self) -> Option<Self> {
        Some(self)
    }
}

impl ReplayableBody for () {
    fn try_clone(&self) -> Option<Self> {
        Some(())
    }
}

// Streams: sent once, never replayed.

impl ReplayableBody for hyper::body::Incoming {
    fn try_clone(&self) -> Option<Self> {
        None
    }
}

#[cfg(feature = "axum")]
impl ReplayableBody for axum_core::body::Body {
    fn try_clone(&self) -> Option<Self> {
        None
    }
}

impl<D, E> ReplayableBody for http_body_util::combinators::BoxBody<D, E> {
    fn try_clone(&self) -> Option<Self> {
        None
    }
}

impl<D, E> ReplayableBody for http_body_util::combinators::UnsyncBoxBody<D, E> {
    fn try_clone(&self) -> Option<Self> {
        None
    }
}

impl<B> ReplayableBody for ReplayBody<B> {
    fn try_clone(&self) -> Option<Self> {
        match self {
            Self::Buffered { data } => Some(Self::Buffered { data: data.clone() }),
            Self::Streaming { .. } => None,
        }
    }
}

pin_project! {
    /// A request body that is either held in memory, and so can be replayed
    /// after a `401`, or streamed, and so cannot.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Empty;
    /// use sso_token_proxy::layer::{ReplayBody, ReplayableBody};
    ///
    /// let buffered: ReplayBody<Empty<Bytes>> = ReplayBody::buffered("{\"a\":1}");
    /// assert!(buffered.try_clone().is_some());
    /// let streaming = ReplayBody::streaming(Empty::<Bytes>::new());
    /// assert!(streaming.try_clone().is_none());
    /// ```
    #[project = ReplayBodyProj]
    #[derive(Debug)]
    // Variant fields cannot carry docs inside `pin_project!`; the variant
    // docs name them.
    #[allow(missing_docs)]
    #[non_exhaustive]
    pub enum ReplayBody<B> {
        /// The whole body in memory (`data`, the bytes still to send):
        /// replayable.
        Buffered { data: Bytes },
        /// A body streamed from elsewhere (`body`): sent once.
        Streaming { #[pin] body: B },
    }
}

impl<B> ReplayBody<B> {
    /// A replayable body holding `data`.
    pub fn buffered(data: impl Into<Bytes>) -> Self {
        Self::Buffered { data: data.into() }
    }

    /// A replayable empty body.
    pub fn empty() -> Self {
        Self::Buffered { data: Bytes::new() }
    }

    /// A body streamed from `body`, never replayed.
    pub fn streaming(body: B) -> Self {
        Self::Streaming { body }
    }

    /// Whether a request with this body can be replayed.
    pub fn is_replayable(&self) -> bool {
        matches!(self, Self::Buffered { .. })
    }
}

impl<B> Default for ReplayBody<B> {
    fn default() -> Self {
        Self::empty()
    }
}

impl<B> From<Bytes> for ReplayBody<B> {
    fn from(data: Bytes) -> Self {
        Self::buffered(data)
    }
}

impl<B> From<String> for ReplayBody<B> {
    fn from(data: String) -> Self {
        Self::buffered(data)
    }
}

impl<B> From<&'static str> for ReplayBody<B> {
    fn from(data: &'static str) -> Self {
        Self::buffered(data)
    }
}

impl<B> From<Vec<u8>> for ReplayBody<B> {
    fn from(data: Vec<u8>) -> Self {
        Self::buffered(data)
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project() {
            ReplayBodyProj::Buffered { data } => {
                if data.is_empty() {
                    Poll::Ready(None)
                } else {
                    Poll::Ready(Some(Ok(Frame::data(mem::take(data)))))
                }
            }
            ReplayBodyProj::Streaming { body } => body.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Buffered { data } => data.is_empty(),
            Self::Streaming { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Buffered { data } => SizeHint::with_exact(data.len() as u64),
            Self::Streaming { body } => body.size_hint(),
        }
    }
}
