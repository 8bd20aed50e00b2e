//! [`ConnActivity`]: what one client connection is doing, and
//! [`ConnTimers`]: the timers that follow from it.
//!
//! Every state of a client connection has a timer:
//!
//! | state | timer | then |
//! |---|---|---|
//! | accepted, no request yet (no bytes, a partial HTTP/1 head, an h2 preface with no stream) | `header_read_timeout` from accept | closed (h2: GOAWAY, then closed after `drain_timeout`) |
//! | HTTP/1 waiting for a later request head | `header_read_timeout` after the last request ended | asked to close: closed at once, as nothing is in flight |
//! | reading a request body | `request_body_timeout` (see `upload.rs` and `service.rs`) | `408`, closed |
//! | writing a response the client does not read | `send_timeout` without progress | closed |
//! | no request in flight | `idle_timeout` after the last one ended | asked to close (h2: GOAWAY) |
//! | asked to close (idle, shutdown) with nothing in flight | `drain_timeout` | closed |
//!
//! The connection's task sleeps until the earliest of them and then asks
//! [`ConnActivity::next_step`] what to do. The state is kept in atomics
//! that the request path and the socket touch with relaxed stores; the
//! task reads them only when its timer fires.
//!
//! hyper's own `header_read_timeout` is off: it arms a boxed timer for
//! every request head and has the connection poll its socket once more
//! after each response, about 1,600 instructions a request (BENCHMARKS.md).
//! The deadlines above cover the same heads: a later HTTP/1 head can only
//! start once the previous request has ended, which is when its clock
//! starts here.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::Version;
use tokio::time::Instant;

use super::metrics::ProxyMetrics;

/// The shortest time between two looks at a busy connection.
const MIN_LOOK: Duration = Duration::from_millis(50);

/// The connection timers of [`ConnActivity::next_step`].
#[derive(Debug, Clone, Copy)]
pub(super) struct ConnTimers {
    /// From accept to the first request's head.
    pub(super) header_read: Duration,
    /// From the last request's end to asking the client to close.
    pub(super) idle: Duration,
    /// A write that makes no progress this long closes the connection.
    pub(super) send: Duration,
    /// From asking to close (with nothing in flight) to closing.
    pub(super) drain: Duration,
}

/// What the connection's task does when its timer fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Close the socket now.
    Close(CloseReason),
    /// Ask the client to close: HTTP/1 closes once idle, h2 sends GOAWAY,
    /// a connection that has not chosen a protocol yet closes at once.
    Drain(DrainReason),
    /// Nothing due; look again then.
    SleepUntil(Instant),
}

/// Why the proxy asked a client connection to close; the `reason` label
/// of `sso_token_proxy_client_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DrainReason {
    /// No request for `idle_timeout`.
    Idle,
    /// No request head within `header_read_timeout`: the first one of
    /// any connection, or a later one of an HTTP/1 connection.
    HeaderTimeout,
}

impl DrainReason {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::HeaderTimeout => "header_timeout",
        }
    }
}

/// Why the proxy closed a client connection; the `reason` label of
/// `sso_token_proxy_client_connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CloseReason {
    /// The client took no response bytes for `send_timeout`.
    SendTimeout,
    /// Asked to close, it did not within `drain_timeout`.
    DrainTimeout,
    /// An HTTP/1 connection did not send its first request head within
    /// `header_read_timeout` (hyper would wait on for a partial one).
    HeaderTimeout,
    /// An HTTP/2 client flooded control frames.
    Http2Abuse,
}

impl CloseReason {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::SendTimeout => "send_timeout",
            Self::DrainTimeout => "drain_timeout",
            Self::HeaderTimeout => "header_timeout",
            Self::Http2Abuse => "http2_abuse",
        }
    }
}

/// What one client connection is doing.
#[derive(Debug)]
pub(super) struct ConnActivity {
    metrics: Arc<ProxyMetrics>,
    opened: Instant,
    in_flight: AtomicUsize,
    /// Whether a request has started on it.
    served: AtomicBool,
    /// Whether it speaks HTTP/1, whose later request heads are timed too;
    /// known from its first bytes or from its first request.
    http1: AtomicBool,
    /// When the last request finished, in ms after `opened`.
    last_done_ms: AtomicU64,
    /// When a write first found the socket full, in ms after `opened`,
    /// plus one; zero while writes make progress.
    write_blocked_ms: AtomicU64,
    /// Set by the socket's HTTP/2 frame monitor.
    abusive: AtomicBool,
}

impl ConnActivity {
    pub(super) fn new(metrics: Arc<ProxyMetrics>) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            http1: AtomicBool::new(false),
            last_done_ms: AtomicU64::new(0),
            write_blocked_ms: AtomicU64::new(0),
            abusive: AtomicBool::new(false),
        })
    }

    /// The connection's first bytes were an HTTP/1 request's.
    pub(super) fn speaks_http1(&self) {
        self.http1.store(true, Ordering::Relaxed);
    }

    /// Marks a request of `version` as started; it ends when the guard is
    /// dropped.
    pub(super) fn start(self: &Arc<Self>, version: Version) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if !self.served.load(Ordering::Relaxed) {
            if version != Version::HTTP_2 {
                self.speaks_http1();
            }
            self.served.store(true, Ordering::Relaxed);
        }
        self.metrics.in_flight().increment(1.0);
        RequestGuard {
            activity: Arc::clone(self),
        }
    }

    fn ms_since_open(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.opened).as_millis() as u64
    }

    fn at_ms(&self, ms: u64) -> Instant {
        self.opened + Duration::from_millis(ms)
    }

    /// A write found the socket full.
    pub(super) fn write_blocked(&self) {
        if self.write_blocked_ms.load(Ordering::Relaxed) == 0 {
            let now = self.ms_since_open(Instant::now()) + 1;
            self.write_blocked_ms.store(now, Ordering::Relaxed);
        }
    }

    /// A write made progress.
    pub(super) fn write_progressed(&self) {
        if self.write_blocked_ms.load(Ordering::Relaxed) != 0 {
            self.write_blocked_ms.store(0, Ordering::Relaxed);
        }
    }

    /// The HTTP/2 frame monitor saw a flood.
    pub(super) fn mark_abusive(&self) {
        self.abusive.store(true, Ordering::Relaxed);
    }

    pub(super) fn is_abusive(&self) -> bool {
        self.abusive.load(Ordering::Relaxed)
    }

    /// What to do at `now`, with `closing_since` set once the connection
    /// was asked to close.
    pub(super) fn next_step(
        &self,
        now: Instant,
        timers: &ConnTimers,
        closing_since: Option<Instant>,
    ) -> Step {
        if self.is_abusive() {
            return Step::Close(CloseReason::Http2Abuse);
        }
        let in_flight = self.in_flight.load(Ordering::Acquire);
        let served = self.served.load(Ordering::Relaxed);
        let http1 = self.http1.load(Ordering::Relaxed);
        // While requests are in flight, look again now and then: for a
        // write that stopped, and so that the deadlines that start when
        // they end (idle, HTTP/1's next head) are never passed before the
        // next look. Never spin on a zero timer.
        let mut every = timers.send.min(timers.idle);
        if http1 {
            every = every.min(timers.header_read);
        }
        let mut next = now + every.max(MIN_LOOK);

        let blocked = self.write_blocked_ms.load(Ordering::Relaxed);
        if blocked != 0 {
            let deadline = self.at_ms(blocked - 1) + timers.send;
            if now >= deadline {
                return Step::Close(CloseReason::SendTimeout);
            }
            next = next.min(deadline);
        }

        if !served && closing_since.is_none() {
            let deadline = self.opened + timers.header_read;
            if now >= deadline {
                // Part of an HTTP/1 head: hyper would wait for the rest
                // even when asked to close, so it is closed here. Anything
                // else closes when asked (h2 after a GOAWAY).
                return if http1 {
                    Step::Close(CloseReason::HeaderTimeout)
                } else {
                    Step::Drain(DrainReason::HeaderTimeout)
                };
            }
            next = next.min(deadline);
        }

        if in_flight == 0 {
            let last_done = self.at_ms(self.last_done_ms.load(Ordering::Acquire));
            match closing_since {
                Some(since) => {
                    let deadline = since.max(last_done) + timers.drain;
                    if now >= deadline {
                        return Step::Close(CloseReason::DrainTimeout);
                    }
                    next = next.min(deadline);
                }
                None if served => {
                    // HTTP/1's next head is due `header_read` after the
                    // last request ended; when that comes first, the
                    // connection is asked to close as if idle. With nothing
                    // in flight hyper closes it at once, part of a head
                    // read or not.
                    let (deadline, reason) = if http1 && timers.header_read < timers.idle {
                        (last_done + timers.header_read, DrainReason::HeaderTimeout)
                    } else {
                        (last_done + timers.idle, DrainReason::Idle)
                    };
                    if now >= deadline {
                        return Step::Drain(reason);
                    }
                    next = next.min(deadline);
                }
                // Not served yet: the header timer above applies.
                None => {}
            }
        }
        Step::SleepUntil(next)
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
        let done = a.ms_since_open(Instant::now());
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

    const TIMERS: ConnTimers = ConnTimers {
        header_read: Duration::from_secs(5),
        idle: Duration::from_secs(10),
        send: Duration::from_secs(20),
        drain: Duration::from_secs(3),
    };

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_is_closed_at_the_header_timeout() {
        let activity = ConnActivity::new(Arc::default());
        let opened = Instant::now();
        assert_eq!(
            activity.next_step(opened, &TIMERS, None),
            Step::SleepUntil(opened + s(5))
        );
        assert_eq!(
            activity.next_step(opened + s(5), &TIMERS, None),
            Step::Drain(DrainReason::HeaderTimeout)
        );
        // An h2 client that does not go when told is closed.
        let asked = opened + s(5);
        assert_eq!(
            activity.next_step(asked, &TIMERS, Some(asked)),
            Step::SleepUntil(asked + s(3))
        );
        assert_eq!(
            activity.next_step(asked + s(3), &TIMERS, Some(asked)),
            Step::Close(CloseReason::DrainTimeout)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn part_of_a_first_http1_head_is_closed_at_the_header_timeout() {
        let activity = ConnActivity::new(Arc::default());
        activity.speaks_http1();
        let opened = Instant::now();
        assert_eq!(
            activity.next_step(opened + s(4), &TIMERS, None),
            Step::SleepUntil(opened + s(5))
        );
        assert_eq!(
            activity.next_step(opened + s(5), &TIMERS, None),
            Step::Close(CloseReason::HeaderTimeout)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_http1_head_is_due_a_header_timeout_after_the_last_request() {
        let activity = ConnActivity::new(Arc::default());
        let guard = activity.start(Version::HTTP_11);
        tokio::time::advance(s(30)).await;
        // In flight, however long: no head is due, but the next look comes
        // no later than a head could be due once the request ends.
        let now = Instant::now();
        assert_eq!(
            activity.next_step(now, &TIMERS, None),
            Step::SleepUntil(now + s(5))
        );
        drop(guard);
        let ended = Instant::now();
        assert_eq!(
            activity.next_step(ended, &TIMERS, None),
            Step::SleepUntil(ended + s(5))
        );
        assert_eq!(
            activity.next_step(ended + s(5), &TIMERS, None),
            Step::Drain(DrainReason::HeaderTimeout)
        );
        // A new request stops that clock; its end starts it again.
        let guard = activity.start(Version::HTTP_11);
        tokio::time::advance(s(7)).await;
        drop(guard);
        let ended = Instant::now();
        assert_eq!(
            activity.next_step(ended + s(4), &TIMERS, None),
            Step::SleepUntil(ended + s(5))
        );
        // With the idle timer the shorter one, the idle timer decides.
        let short_idle = ConnTimers {
            idle: s(2),
            ..TIMERS
        };
        assert_eq!(
            activity.next_step(ended + s(2), &short_idle, None),
            Step::Drain(DrainReason::Idle)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_waits_for_requests_to_end() {
        let activity = ConnActivity::new(Arc::default());
        // h2: no later heads to time, only the idle timer.
        let guard = activity.start(Version::HTTP_2);
        // A request in flight keeps the connection busy however long it
        // takes: no drain, no close, only later looks.
        tokio::time::advance(s(60)).await;
        let now = Instant::now();
        match activity.next_step(now, &TIMERS, None) {
            Step::SleepUntil(t) => assert!(t > now),
            other => panic!("{other:?}"),
        }
        drop(guard);
        let ended = Instant::now();
        assert_eq!(
            activity.next_step(ended, &TIMERS, None),
            Step::SleepUntil(ended + s(10))
        );
        assert_eq!(
            activity.next_step(ended + s(10), &TIMERS, None),
            Step::Drain(DrainReason::Idle)
        );
        // Asked to close: closed after the drain timeout unless it went.
        let asked = ended + s(10);
        assert_eq!(
            activity.next_step(asked, &TIMERS, Some(asked)),
            Step::SleepUntil(asked + s(3))
        );
        assert_eq!(
            activity.next_step(asked + s(3), &TIMERS, Some(asked)),
            Step::Close(CloseReason::DrainTimeout)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_without_progress_closes_after_the_send_timeout() {
        let activity = ConnActivity::new(Arc::default());
        // h2, so that only the idle timer bounds the looks in between.
        let _guard = activity.start(Version::HTTP_2);
        activity.write_blocked();
        let blocked = Instant::now();
        tokio::time::advance(s(5)).await;
        // Still blocked from the first time, not from the latest.
        activity.write_blocked();
        assert_eq!(
            activity.next_step(Instant::now(), &TIMERS, None),
            Step::SleepUntil(Instant::now() + s(10))
        );
        assert_eq!(
            activity.next_step(blocked + s(20), &TIMERS, None),
            Step::Close(CloseReason::SendTimeout)
        );
        activity.write_progressed();
        assert!(matches!(
            activity.next_step(blocked + s(20), &TIMERS, None),
            Step::SleepUntil(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn an_abusive_connection_is_closed_at_once() {
        let activity = ConnActivity::new(Arc::default());
        activity.mark_abusive();
        assert_eq!(
            activity.next_step(Instant::now(), &TIMERS, None),
            Step::Close(CloseReason::Http2Abuse)
        );
    }
}
