//! The body of every response the proxy sends, and the per-request
//! bookkeeping that lives exactly as long as that body.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::metrics::ProxyMetrics;

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

// === impl ConnActivity ===

/// What one client connection is doing, for the idle timeout.
#[derive(Debug)]
pub(super) struct ConnActivity {
    metrics: Arc<ProxyMetrics>,
    opened: Instant,
    in_flight: AtomicUsize,
    /// When the last request finished, in ms after `opened`.
    last_done_ms: AtomicU64,
}

impl ConnActivity {
    pub(super) fn new(metrics: Arc<ProxyMetrics>) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_done_ms: AtomicU64::new(0),
        })
    }

    /// Marks a request as started; it ends when the guard is dropped.
    pub(super) fn start(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.metrics.in_flight().increment(1.0);
        RequestGuard {
            activity: Arc::clone(self),
        }
    }

    /// Resolves once the connection has had no request in flight for
    /// `timeout`.
    pub(super) async fn idle_for(&self, timeout: Duration) {
        loop {
            if self.in_flight.load(Ordering::Acquire) > 0 {
                // A long request: look again later rather than being woken
                // by every request's end.
                tokio::time::sleep(timeout).await;
                continue;
            }
            let deadline = self.opened
                + Duration::from_millis(self.last_done_ms.load(Ordering::Acquire))
                + timeout;
            if Instant::now() >= deadline {
                if self.in_flight.load(Ordering::Acquire) == 0 {
                    return;
                }
                continue;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// One request in flight on a connection.
#[derive(Debug)]
pub(crate) struct RequestGuard {
    activity: Arc<ConnActivity>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let a = &*self.activity;
        let done = a.opened.elapsed().as_millis() as u64;
        // Record the time before the count drops, so the idle check never
        // sees zero requests with a stale time.
        a.last_done_ms.fetch_max(done, Ordering::AcqRel);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
        a.metrics.in_flight().decrement(1.0);
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

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_requests_to_end() {
        let activity = ConnActivity::new(Arc::default());
        let guard = activity.start();
        let idle = activity.idle_for(Duration::from_secs(10));
        tokio::pin!(idle);
        // A request in flight keeps the connection busy however long it takes.
        assert!(
            tokio::time::timeout(Duration::from_secs(60), idle.as_mut())
                .await
                .is_err()
        );
        drop(guard);
        let ended = Instant::now();
        idle.await;
        assert!(Instant::now() >= ended + Duration::from_secs(10));
        assert!(Instant::now() < ended + Duration::from_secs(11));
    }
}
