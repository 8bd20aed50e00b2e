//! [`ClientBody`]: a client's request body streamed to the upstream, with
//! a timer for a client that stops sending and a record ([`Upload`]) of
//! how far it has got.
//!
//! * A client that sends nothing for `request_body_timeout` while the
//!   proxy waits for it ends the body with [`ClientBodyError::Timeout`];
//!   a body that breaks (bad chunked coding, shorter than its
//!   `Content-Length`) ends it with [`ClientBodyError::Malformed`]. Either
//!   aborts the upstream request, and the forwarder, reading [`Upload`],
//!   answers it as the client's fault (`408`, `400`), not the upstream's.
//! * Trailer fields the client sends after the body are dropped: the body
//!   ends with them.
//! * The upstream's response timer starts once the body has been sent:
//!   [`Upload`] says when the last part went out, and whether the proxy is
//!   waiting on the client (then the body's own timer applies).
//!
//! The timer is created only when the client first makes the proxy wait.

use std::{
    future::Future as _,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::layer::{ReplayBody, ReplayableBody};

/// The request body the token layer and the forwarder see: buffered
/// (replayable) or streamed from the client.
///
/// A streamed body is boxed: requests wait in hyper's channel to the
/// upstream connection, whose slots (two blocks of 32 per connection) are
/// as large as the request, so a bodyless request is kept at 256 bytes
/// instead of 312.
pub(crate) type UpstreamBody = ReplayBody<Box<ClientBody>>;

/// Why a client's request body did not arrive.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientBodyError {
    /// The client sent nothing for this long while the proxy waited.
    #[error("the client sent no request body bytes for {0:?}")]
    Timeout(Duration),
    /// Bad framing, or the client closed before the end.
    #[error("the client's request body is malformed or was cut off")]
    Malformed(#[source] hyper::Error),
}

/// How a streamed upload is going, shared by the body (in the upstream
/// connection's task) and the forwarder's response future.
#[derive(Debug)]
pub(crate) struct Upload {
    started: Instant,
    state: AtomicU8,
    /// When the last part went out (or the body ended), in ms after
    /// `started`.
    progress_ms: AtomicU64,
}

/// What [`Upload::status`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UploadStatus {
    /// Parts are going out; the last at this instant.
    Sending(Instant),
    /// The proxy is waiting for the client's next part.
    WaitingOnClient,
    /// The whole body went out at this instant.
    Sent(Instant),
    /// The client stopped sending.
    ClientTimedOut,
    /// The client's body is malformed.
    ClientMalformed,
}

const SENDING: u8 = 0;
const WAITING: u8 = 1;
const SENT: u8 = 2;
const TIMED_OUT: u8 = 3;
const MALFORMED: u8 = 4;

impl Upload {
    fn new(now: Instant) -> Self {
        Self {
            started: now,
            state: AtomicU8::new(SENDING),
            progress_ms: AtomicU64::new(0),
        }
    }

    fn set(&self, state: u8, now: Option<Instant>) {
        if let Some(now) = now {
            let ms = now.saturating_duration_since(self.started).as_millis() as u64;
            self.progress_ms.store(ms, Ordering::Relaxed);
        }
        self.state.store(state, Ordering::Release);
    }

    pub(crate) fn status(&self) -> UploadStatus {
        let at = || self.started + Duration::from_millis(self.progress_ms.load(Ordering::Relaxed));
        match self.state.load(Ordering::Acquire) {
            SENDING => UploadStatus::Sending(at()),
            WAITING => UploadStatus::WaitingOnClient,
            SENT => UploadStatus::Sent(at()),
            TIMED_OUT => UploadStatus::ClientTimedOut,
            _ => UploadStatus::ClientMalformed,
        }
    }
}

/// A client's request body on its way upstream; see the module docs.
#[derive(Debug)]
pub(crate) struct ClientBody {
    inner: Incoming,
    pause_limit: Duration,
    last_data: Instant,
    timer: Option<Pin<Box<Sleep>>>,
    upload: Arc<Upload>,
}

impl ClientBody {
    /// `inner`, ended with [`ClientBodyError::Timeout`] when the client
    /// pauses for `pause_limit`.
    pub(crate) fn new(inner: Incoming, pause_limit: Duration) -> Self {
        let now = Instant::now();
        Self {
            inner,
            pause_limit,
            last_data: now,
            timer: None,
            upload: Arc::new(Upload::new(now)),
        }
    }

    pub(crate) fn upload(&self) -> &Arc<Upload> {
        &self.upload
    }
}

impl ReplayableBody for ClientBody {
    fn try_clone(&self) -> Option<Self> {
        None
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) if frame.is_data() => {
                let now = Instant::now();
                this.last_data = now;
                this.upload.set(SENDING, Some(now));
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Ok(_trailers))) => {
                // Trailers end the body and are not forwarded, as a
                // buffered body's are not: no header rule of the proxy
                // looks at them, so a client's `Authorization` there
                // would be a second credential beside the token.
                tracing::debug!("request trailers dropped");
                this.upload.set(SENT, Some(Instant::now()));
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.upload.set(MALFORMED, None);
                Poll::Ready(Some(Err(ClientBodyError::Malformed(e))))
            }
            Poll::Ready(None) => {
                this.upload.set(SENT, Some(Instant::now()));
                Poll::Ready(None)
            }
            Poll::Pending => {
                this.upload.set(WAITING, None);
                let deadline = this.last_data + this.pause_limit;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    this.upload.set(TIMED_OUT, None);
                    return Poll::Ready(Some(Err(ClientBodyError::Timeout(this.pause_limit))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The upload of a request body, when it is streamed.
pub(crate) fn upload_of(body: &UpstreamBody) -> Option<Arc<Upload>> {
    match body {
        ReplayBody::Streaming { body } => Some(Arc::clone(body.upload())),
        ReplayBody::Buffered { .. } => None,
    }
}
