//! A send timer for each HTTP/2 stream.
//!
//! An HTTP/1 client that takes no response bytes fills its socket, and
//! the connection's `send_timeout` closes it (`activity.rs`). An HTTP/2
//! client can take nothing without filling anything: it opens no
//! flow-control window (`SETTINGS_INITIAL_WINDOW_SIZE` 0, or never a
//! `WINDOW_UPDATE`), gets the response head, and hyper waits for window
//! before it asks the body for more. Meanwhile the stream holds the
//! upstream connection its body comes from, so a few such streams would
//! take every place under `upstream_max_connections` for as long as the
//! client kept its connection open.
//!
//! hyper runs every HTTP/2 stream (the service's future, then the body
//! sent out) as a task of its own through the connection builder's
//! executor. [`StreamExecutor`] spawns each one inside [`Watched`], which
//! learns after each poll of the stream what the response did during it
//! (from [`answered`] and [`upstream_pending`], called by the response
//! future and body):
//!
//! * a head or a body frame went out: the client is owed nothing more from
//!   the upstream, so from now the stream waits on the client;
//! * the body waited for the upstream: the upstream's timers apply, not
//!   this one;
//! * neither: whatever it waited on before, it still does.
//!
//! A stream that waits on the client for `send_timeout` without another
//! frame going out is dropped: h2 resets it (`RST_STREAM` `CANCEL`), the
//! upstream connection it held is closed, and the client's other streams
//! and its connection go on, as nginx's `send_timeout` treats an HTTP/2
//! stream that its flow control stops.
//!
//! The request path pays one thread-local store per response head and per
//! body frame, whatever the protocol; only HTTP/2 streams read it.

use std::{
    cell::Cell,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::metrics::{ClientError, ProxyMetrics};

/// What the response of the stream being polled did during this poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Nothing,
    /// A head or a body frame was handed to hyper.
    Answered,
    /// The body asked the upstream for more and has to wait.
    UpstreamPending,
}

thread_local! {
    static SEEN: Cell<Seen> = const { Cell::new(Seen::Nothing) };
}

/// A response head or body frame is being handed to hyper.
pub(super) fn answered() {
    SEEN.set(Seen::Answered);
}

/// The response body waits for the upstream.
pub(super) fn upstream_pending() {
    SEEN.set(Seen::UpstreamPending);
}

/// The executor of the HTTP/2 connection builders: spawns each stream's
/// task on the current runtime inside a [`Watched`].
#[derive(Debug, Clone)]
pub(super) struct StreamExecutor {
    send_timeout: Duration,
    /// Counts the streams dropped by their send timer.
    metrics: Arc<ProxyMetrics>,
}

impl StreamExecutor {
    pub(super) fn new(send_timeout: Duration, metrics: Arc<ProxyMetrics>) -> Self {
        Self {
            send_timeout,
            metrics,
        }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Watched {
            stream: fut,
            send_timeout: self.send_timeout,
            waiting_since: None,
            timer: None,
            metrics: Arc::clone(&self.metrics),
        });
    }
}

pin_project! {
    /// One HTTP/2 stream's task, dropped once it has waited on its client
    /// for `send_timeout`.
    struct Watched<F> {
        #[pin]
        stream: F,
        send_timeout: Duration,
        // When the stream last handed out a frame, while it waits on the
        // client; `None` while it waits on the service or the upstream.
        waiting_since: Option<Instant>,
        // Set on the first wait on the client (most streams never wait);
        // moved on lazily, when it fires early.
        timer: Option<Pin<Box<Sleep>>>,
        metrics: Arc<ProxyMetrics>,
    }
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let outer = SEEN.replace(Seen::Nothing);
        let done = this.stream.poll(cx);
        let seen = SEEN.replace(outer);
        if done.is_ready() {
            return Poll::Ready(());
        }
        match seen {
            Seen::Answered => *this.waiting_since = Some(Instant::now()),
            Seen::UpstreamPending => *this.waiting_since = None,
            Seen::Nothing => {}
        }
        let Some(since) = *this.waiting_since else {
            return Poll::Pending;
        };
        let due = since + *this.send_timeout;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() != due && timer.deadline() <= Instant::now() {
            // It fired for an earlier frame: wait on from the last one.
            timer.as_mut().reset(due);
        }
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        tracing::debug!(
            send_timeout = ?this.send_timeout,
            "HTTP/2 client took no response bytes; resetting its stream"
        );
        this.metrics
            .client_errors(ClientError::SendTimeout)
            .increment(1);
        // Dropping the stream resets it (`CANCEL`) and closes the upstream
        // connection of a body not read to its end.
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A stand-in for hyper's stream task that never ends: on each poll it
    /// reports what the test put in `next` (if anything).
    struct Stream {
        next: Arc<Mutex<Seen>>,
    }

    impl Future for Stream {
        type Output = ();

        fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
            match std::mem::replace(&mut *self.next.lock().unwrap(), Seen::Nothing) {
                Seen::Answered => answered(),
                Seen::UpstreamPending => upstream_pending(),
                Seen::Nothing => {}
            }
            Poll::Pending
        }
    }

    const SEND_TIMEOUT: Duration = Duration::from_secs(10);

    fn watched() -> (Pin<Box<Watched<Stream>>>, Arc<Mutex<Seen>>) {
        let next = Arc::new(Mutex::new(Seen::Nothing));
        let w = Watched {
            stream: Stream {
                next: Arc::clone(&next),
            },
            send_timeout: SEND_TIMEOUT,
            waiting_since: None,
            timer: None,
            metrics: Arc::default(),
        };
        (Box::pin(w), next)
    }

    /// Polls `w` once after its stream reports `seen`; whether it ended.
    async fn step(w: &mut Pin<Box<Watched<Stream>>>, next: &Mutex<Seen>, seen: Seen) -> bool {
        *next.lock().unwrap() = seen;
        std::future::poll_fn(|cx| Poll::Ready(w.as_mut().poll(cx).is_ready())).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_waiting_on_its_client_ends_after_the_send_timeout() {
        let (mut w, next) = watched();
        let start = Instant::now();
        assert!(!step(&mut w, &next, Seen::Answered).await);
        w.await;
        assert_eq!(start.elapsed(), SEND_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_waiting_on_the_service_or_the_upstream_is_left_alone() {
        for seen in [
            &[Seen::Nothing][..],
            &[Seen::Answered, Seen::UpstreamPending],
            &[Seen::Answered, Seen::UpstreamPending, Seen::Nothing],
        ] {
            let (mut w, next) = watched();
            for &s in seen {
                assert!(!step(&mut w, &next, s).await);
            }
            let ended = tokio::time::timeout(Duration::from_secs(3600), w).await;
            assert!(
                ended.is_err(),
                "{seen:?}: ended while not waiting on the client"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_frame_handed_out_starts_the_send_timeout_again() {
        let (mut w, next) = watched();
        let start = Instant::now();
        assert!(!step(&mut w, &next, Seen::Answered).await);
        // A frame every 6 s, three times (the timer armed for the first
        // fires in between and is moved on): the stream lives on.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            assert!(!step(&mut w, &next, Seen::Answered).await);
        }
        // Then nothing: it ends one send timeout after the last frame.
        w.await;
        assert_eq!(start.elapsed(), Duration::from_secs(18) + SEND_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn only_what_the_stream_itself_reported_counts() {
        let (mut w, next) = watched();
        // Reported outside any stream's poll (an HTTP/1 response, say).
        answered();
        assert!(!step(&mut w, &next, Seen::Nothing).await);
        let ended = tokio::time::timeout(Duration::from_secs(3600), w).await;
        assert!(ended.is_err(), "a report from outside the stream counted");
    }
}
