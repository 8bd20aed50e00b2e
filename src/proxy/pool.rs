//! [`UpstreamPool`]: connections to the one upstream, on hyper's
//! connection-level client.
//!
//! The proxy talks to a single origin, so the pool needs no key: HTTP/1.1
//! connections wait in one stack (last used first out, so a burst's extra
//! connections sink to the bottom and age out), and an HTTP/2 connection,
//! when ALPN picked h2, is shared by every request. A checkout is a lock,
//! a pop and a readiness check; there is no hashing and no task spawned per
//! request.
//!
//! An HTTP/1.1 connection has no task of its own: hyper's driver for it
//! (its reads and writes) is polled by the task that sends on it, which is
//! the client connection's, until the response has been read; then the
//! connection waits in the pool unpolled. A request and its response thus
//! stay in one task and on one thread, as nginx keeps both sockets of a
//! request in one worker, instead of being handed to the connection's task
//! and back (two wake-ups per request, across threads when the runtime
//! has several). The shared HTTP/2 connection keeps a task of its own.
//!
//! Behaviour:
//! - A request that never left the proxy because the reused connection
//!   turned out to be closed is sent again on another connection (as a
//!   general-purpose pooled client does).
//! - The keep-alive race: an upstream may close a connection that has been
//!   idle at the very moment the proxy sends on it, and the request is then
//!   lost without an answer. An idempotent request (RFC 9110 §9.2.2) with a
//!   body held in memory, sent on a connection that sat idle across a
//!   reaper tick, is kept until its response head arrives; should the
//!   connection fail before that, it is sent once more on a new connection,
//!   as nginx does for its cached upstream connections. Connections in
//!   steady use never sat idle that long, so under load nothing is copied.
//!   Other requests that were written are never sent twice.
//! - A connection returns to the pool only once the upstream's response has
//!   been read to its end; until then it is not offered to anyone.
//! - Connections idle for `idle_timeout` are closed: a reaper ticks every
//!   quarter of it, at most one second apart, and closes connections idle
//!   for longer than the timeout (so within one tick of it).
//! - At most `max_connections` are open at once (idle ones included),
//!   counted over a [`PoolGroup`]: the pools of one route, one per runtime
//!   when the binary runs a runtime per core. A request that finds none
//!   idle and the cap reached waits for the first connection to come back
//!   or close, at most `queue_timeout`; then it fails with
//!   [`PoolError::Saturated`] (the proxy answers `503`). Envoy's circuit
//!   breaker caps connections the same way (1024 by default). Waiting
//!   requests are served in order: a connection that comes back is handed
//!   to the pool's oldest waiting request (one wake-up), so a request that
//!   arrives later cannot take it first, and at the cap connections pass
//!   from request to request instead of being closed and opened again.
//! - Beyond `wait_above` connections (open or being opened; each pool of a
//!   group its share), a request that finds every connection busy first
//!   waits up to `connect_wait` in the queue for one to come back, and
//!   opens a connection only if none does. A burst of requests to an
//!   upstream that answers fast is then served by the connections already
//!   open instead of opening one each (whose buffers and channels would
//!   stay allocated until `idle_timeout`); a slow upstream still gets its
//!   new connections, `connect_wait` later. Such a request is not counted
//!   as waiting at the cap: no other pool closes a connection for it.
//! - Between the pools of a group (one per core) places under the cap move
//!   only by closing a connection so that another pool can open one: a
//!   pool whose requests wait takes the place of another pool's idle
//!   connection when it has none itself, when the other holds two more
//!   than it does, or when that connection has idled across a reaper tick;
//!   and a connection that comes back while such a pool waits is closed
//!   for it. A cap is thus never held by connections idling on another
//!   core, and two busy cores do not trade connections back and forth.
//!   The group's pools also share one HTTP/2 connection.
//! - Response heads may have up to `max_response_headers` fields and
//!   `max_response_header_bytes` bytes (HTTP/1.1), or a header list of that
//!   many bytes (HTTP/2), so that a healthy upstream with a large head is
//!   not turned into a `502`.
//!
//! Metrics: `sso_token_proxy_upstream_connections_opened_total{protocol}`
//! (`http1`, `http2`), and `sso_token_proxy_upstream_connections_idle`,
//! the idle HTTP/1.1 connections, sampled at each reaper tick.

use std::{
    collections::VecDeque,
    error::Error as StdError,
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, Waker, ready},
    time::Duration,
};

use bytes::Bytes;
use http::{
    Method, Request, Response, Uri,
    uri::{Authority, Scheme},
};
use http_body::Body;
use hyper::{
    body::Incoming,
    client::conn::{TrySendError, http1, http2},
};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::{
    client::legacy::connect::{Connection as _, HttpConnector},
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::{
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore, oneshot},
    task::Unconstrained,
};
use tower::Service as _;

use super::task_waker::TaskWaker;
use crate::layer::ReplayableBody;
use crate::metric_names;

type BoxError = Box<dyn StdError + Send + Sync>;

/// What the connector hands back: TCP, or TLS over it.
type UpstreamIo = MaybeHttpsStream<TokioIo<TcpStream>>;

/// hyper's reads and writes for one HTTP/1.1 connection.
type Driver<B> = http1::Connection<WatchedIo, B>;

/// The upstream's answer to one request. Not subject to tokio's budget: an
/// HTTP/1.1 answer is polled without a waker of its own (see
/// [`SendFuture`]), so a budget refusal would never be followed by a wake.
type Promise<B> = Unconstrained<
    Pin<Box<dyn Future<Output = Result<Response<Incoming>, TrySendError<Request<B>>>> + Send>>,
>;

/// A new connection, or the first that comes free under the cap.
type Connecting<B> = Pin<Box<dyn Future<Output = Result<Checkout<B>, PoolError>> + Send>>;

/// How often a request whose reused connection turned out to be closed
/// before anything was written is tried again on another one.
const MAX_UNSENT_RETRIES: usize = 3;

/// The reaper ticks at least this many times per `idle_timeout`...
const TICKS_PER_IDLE_TIMEOUT: u32 = 4;
/// ...and at least this often.
const MAX_TICK: Duration = Duration::from_secs(1);

/// Why the pool produced no response.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PoolError {
    /// No connection could be made (refused, unreachable, TLS, connect
    /// timeout, or the HTTP/2 handshake failed). Nothing was sent.
    #[error("cannot connect to the upstream")]
    Connect(#[source] BoxError),
    /// Every connection stayed busy for this long. Nothing was sent.
    #[error("no upstream connection came free within {0:?}")]
    Saturated(Duration),
    /// The exchange failed on an established connection.
    #[error("the upstream exchange failed")]
    Request(#[source] hyper::Error),
}

/// How a pool keeps its connections (its group limits them).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolSettings {
    /// Idle connections are closed after this; zero keeps none.
    pub(crate) idle_timeout: Duration,
    /// How long a request waits for a connection when all are busy.
    pub(crate) queue_timeout: Duration,
    /// Header fields in an HTTP/1.1 response head.
    pub(crate) max_response_headers: usize,
    /// Bytes in a response head (HTTP/1.1) or header list (HTTP/2).
    pub(crate) max_response_header_bytes: usize,
    /// How long a request that finds every HTTP/1.1 connection busy waits
    /// for one to come back before it opens another, once the group holds
    /// its [`PoolGroup::new`] `wait_above` connections; zero: never.
    pub(crate) connect_wait: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            queue_timeout: Duration::from_secs(5),
            max_response_headers: 256,
            max_response_header_bytes: 128 * 1024,
            connect_wait: Duration::ZERO,
        }
    }
}

/// Connections to one upstream. Cheap to clone.
pub(crate) struct UpstreamPool<B: Body + 'static> {
    inner: Arc<Inner<B>>,
}

impl<B: Body + 'static> Clone for UpstreamPool<B> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<B: Body + 'static> fmt::Debug for UpstreamPool<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let idle = self.inner.idle.lock().map_or(0, |idle| idle.conns.len());
        f.debug_struct("UpstreamPool")
            .field("origin", &self.inner.origin)
            .field("idle_http1", &idle)
            .finish_non_exhaustive()
    }
}

// === impl PoolGroup ===

/// The pools that keep to one connection cap together: those of one route,
/// one per runtime (`runtime = "thread_per_core"`), or a single pool.
pub(crate) struct PoolGroup<B: Body + 'static> {
    /// One permit per open connection, of any pool of the group.
    permits: Arc<Semaphore>,
    /// Connections the group opens without waiting first (see
    /// [`PoolSettings::connect_wait`]), shared out evenly over its pools.
    wait_above: usize,
    /// Pools in the group, for each one's share of `wait_above`.
    pool_count: AtomicUsize,
    /// Requests waiting for a connection, in every pool of the group.
    queued: AtomicUsize,
    pools: Mutex<Vec<Weak<Inner<B>>>>,
    /// The shared HTTP/2 connection, once ALPN has chosen h2, with its
    /// number.
    shared_h2: Mutex<Option<(u64, http2::SendRequest<B>)>>,
    /// Numbers HTTP/2 connections.
    h2_opened: AtomicU64,
    /// Set once the upstream has answered ALPN with h2: later connects are
    /// then made one at a time, so that one connection is shared.
    prefers_h2: AtomicBool,
    h2_connecting: tokio::sync::Mutex<()>,
}

impl<B: Body + 'static> PoolGroup<B> {
    /// A group whose pools keep at most `max_connections` open together,
    /// and open more than `wait_above` only after a wait for one to come
    /// back (when their `connect_wait` is not zero).
    pub(crate) fn new(max_connections: usize, wait_above: usize) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(max_connections)),
            wait_above,
            pool_count: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            pools: Mutex::new(Vec::new()),
            shared_h2: Mutex::new(None),
            h2_opened: AtomicU64::new(0),
            prefers_h2: AtomicBool::new(false),
            h2_connecting: tokio::sync::Mutex::new(()),
        })
    }

    fn pools(&self) -> Vec<Arc<Inner<B>>> {
        lock(&self.pools).iter().filter_map(Weak::upgrade).collect()
    }

    /// Closes the oldest idle connection of another pool, if that pool
    /// owes `here` a connection ([`owes`]) or let the connection idle across
    /// a reaper tick, and gives its place under the cap to the request that
    /// has waited longest in `here`; whether there was one.
    fn close_idle_elsewhere(&self, here: &Arc<Inner<B>>) -> bool {
        if lock(&self.pools).len() < 2 {
            return false;
        }
        for pool in self.pools() {
            if Arc::ptr_eq(&pool, here) {
                continue;
            }
            let oldest = {
                let mut idle = lock(&pool.idle);
                let spare = idle.conns.first().is_some_and(|oldest| {
                    owes(&pool, here) || oldest.since_epoch != pool.epoch.load(Ordering::Relaxed)
                });
                spare.then(|| idle.conns.remove(0))
            };
            if let Some(oldest) = oldest {
                here.take_place(oldest.conn.close_keeping_place());
                return true;
            }
        }
        false
    }

    /// Idle HTTP/1.1 connections over all pools.
    fn idle_count(&self) -> usize {
        self.pools().iter().map(|p| lock(&p.idle).conns.len()).sum()
    }

    /// Another pool that a request waits in and that `here` owes a
    /// connection ([`owes`]), if there is one.
    fn owed_elsewhere(&self, here: &Inner<B>) -> Option<Arc<Inner<B>>> {
        lock(&self.pools)
            .iter()
            .filter_map(Weak::upgrade)
            .find(|pool| {
                !std::ptr::eq(&**pool, here)
                    && pool.queued.load(Ordering::SeqCst) > 0
                    && owes(here, pool)
            })
    }

    /// Stops sharing HTTP/2 connection `id`, which refused a request.
    fn forget_h2(&self, id: u64) {
        let mut shared = lock(&self.shared_h2);
        if shared
            .as_ref()
            .is_some_and(|(shared_id, _)| *shared_id == id)
        {
            *shared = None;
        }
    }

    /// The shared HTTP/2 connection, if it is still open.
    fn live_h2(&self) -> Option<(u64, http2::SendRequest<B>)> {
        let mut shared = lock(&self.shared_h2);
        match &*shared {
            Some((id, sender)) if !sender.is_closed() => Some((*id, sender.clone())),
            Some(_) => {
                *shared = None;
                None
            }
            None => None,
        }
    }
}

struct Inner<B: Body + 'static> {
    /// The route's name, the `route` label of the pool's metrics.
    route: Arc<str>,
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority`, what the connector is asked for.
    origin: Uri,
    scheme: Scheme,
    authority: Authority,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// Idle HTTP/1.1 connections, and the requests waiting for one.
    idle: Mutex<Idle<B>>,
    /// HTTP/1.1 connections of this pool open now, idle or busy.
    open: Arc<AtomicUsize>,
    /// Connections this pool is opening now.
    connecting: AtomicUsize,
    /// Places under the cap other pools gave up for this pool's waiting
    /// requests, not yet taken up ([`PromisedPlace`]).
    promised: AtomicUsize,
    connect_wait: Duration,
    /// The cap, the HTTP/2 connection, and the other pools under them.
    group: Arc<PoolGroup<B>>,
    /// `None`: idle connections are not kept.
    idle_timeout: Option<Duration>,
    /// The reaper's period, and how many of its ticks make `idle_timeout`.
    tick: Duration,
    idle_ticks: u64,
    /// The reaper's tick count; idle connections are stamped with it.
    epoch: AtomicU64,
    reaper_started: AtomicBool,
    queue_timeout: Duration,
    /// Requests waiting for a connection in this pool at the cap.
    queued: AtomicUsize,
    /// Requests waiting for a connection of this pool to come back before
    /// they open one (`connect_wait`). They are in the same queue as those
    /// at the cap, but not counted in the group's: no other pool closes a
    /// connection for them.
    returning: AtomicUsize,
}

impl<B: Body + 'static> Inner<B> {
    /// The requests in this pool's queue that still wait: at the cap, or
    /// for a connection to come back.
    fn waiting(&self) -> usize {
        self.queued.load(Ordering::Relaxed) + self.returning.load(Ordering::Relaxed)
    }

    /// HTTP/1.1 connections the pool has open or is opening, and places
    /// under the cap promised to it.
    fn held(&self) -> usize {
        self.open.load(Ordering::Relaxed)
            + self.connecting.load(Ordering::Relaxed)
            + self.promised.load(Ordering::Relaxed)
    }

    /// A place under the cap that another pool closed a connection for:
    /// to this pool's request that has waited longest, or back to the cap
    /// if none waits any more.
    fn take_place(self: &Arc<Self>, permit: OwnedSemaphorePermit) {
        let mut place = PromisedPlace::new(permit, Arc::clone(self));
        loop {
            let Some(waiter) = lock(&self.idle).waiters.pop_front() else {
                return;
            };
            match waiter.send(Handed::Place(place)) {
                Ok(()) => return,
                // It stopped waiting: the next one, if any.
                Err(Handed::Place(back)) => place = back,
                // What comes back is what was sent.
                Err(Handed::Conn(_)) => return,
            }
        }
    }
}

/// A pool's idle connections and its queue, under one lock, so that a
/// connection that comes back is either handed to a waiting request or
/// kept, never left idle while a request waits.
struct Idle<B: Body + 'static> {
    /// The most recently used last.
    conns: Vec<IdleConn<B>>,
    /// Requests waiting at the cap or for a connection to come back
    /// (`connect_wait`), oldest first. A connection that comes back goes
    /// to the first that still waits, so a request that arrives later
    /// cannot take it before them, and one returned connection wakes one
    /// request, not every one that waits.
    waiters: VecDeque<oneshot::Sender<Handed<B>>>,
    /// How many times `waiters` was swept of requests that stopped waiting.
    #[cfg(test)]
    sweeps: usize,
}

/// What a waiting request is handed: a connection of its pool that came
/// back, or the place under the cap of one that another pool closed for
/// it, to open its own with.
enum Handed<B: Body + 'static> {
    Conn(Http1Conn<B>),
    Place(PromisedPlace<B>),
}

/// A place under the cap that a pool gave up for a request waiting in
/// another. Until that request starts connecting with it (or it is
/// dropped, and the place goes back to the cap), the receiving pool counts
/// it among the connections it holds, so that the giving pool does not
/// give up another for the same shortfall.
struct PromisedPlace<B: Body + 'static> {
    permit: OwnedSemaphorePermit,
    _promised: Promised<B>,
}

impl<B: Body + 'static> PromisedPlace<B> {
    fn new(permit: OwnedSemaphorePermit, to: Arc<Inner<B>>) -> Self {
        to.promised.fetch_add(1, Ordering::Relaxed);
        Self {
            permit,
            _promised: Promised(to),
        }
    }

    /// The place, no longer counted as promised.
    fn redeem(self) -> OwnedSemaphorePermit {
        self.permit
    }
}

/// Counts a place in its pool's `promised` while it lives.
struct Promised<B: Body + 'static>(Arc<Inner<B>>);

impl<B: Body + 'static> Drop for Promised<B> {
    fn drop(&mut self) {
        self.0.promised.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<B: Body + 'static> Idle<B> {
    /// Queues a request for the next connection that comes back.
    /// `still_waiting` is how many of the pool's requests wait now.
    ///
    /// Requests that stopped waiting (timed out, or their client left) are
    /// let go from the front at once. Behind a request that still waits
    /// they would stay until it is served, and a flood of clients that
    /// hang up while the pool is at its cap could pile them up for a whole
    /// `queue_timeout`: so once the queue holds more than twice as many
    /// entries as there are waiting requests (and a few more), the ones
    /// that stopped are swept out. A sweep leaves about as many entries as
    /// requests wait, so the next comes only after as many again have been
    /// queued: its cost per queued request stays constant.
    fn enqueue(&mut self, waiter: oneshot::Sender<Handed<B>>, still_waiting: usize) {
        while self.waiters.front().is_some_and(oneshot::Sender::is_closed) {
            self.waiters.pop_front();
        }
        if self.waiters.len() > 2 * still_waiting + SWEEP_SLACK {
            self.waiters.retain(|w| !w.is_closed());
            #[cfg(test)]
            {
                self.sweeps += 1;
            }
        }
        self.waiters.push_back(waiter);
    }
}

/// How many more queue entries than twice the waiting requests are left
/// before entries of requests that stopped waiting are swept out.
const SWEEP_SLACK: usize = 16;

// === impl Http1Conn ===

/// An HTTP/1.1 connection and its driver. The driver is polled by the task
/// that uses the connection (the client connection's), so a request and
/// its response do not hop between tasks; an idle connection is not polled
/// at all until it is taken again.
pub(crate) struct Http1Conn<B: Body + 'static> {
    sender: http1::SendRequest<B>,
    /// `None` once the connection has closed.
    driver: Option<Box<Driver<B>>>,
    /// The waker the driver is polled with; see [`WakeRelay`].
    relay: Arc<WakeRelay>,
    relay_waker: Waker,
    /// Its place under `max_connections`, given back when it is dropped.
    place: Place,
}

/// An HTTP/1.1 connection's place under the group's cap and in its pool's
/// count of open connections; both are given back when it is dropped.
struct Place {
    permit: OwnedSemaphorePermit,
    _open: OpenCount,
}

impl Place {
    fn new(permit: OwnedSemaphorePermit, open: &Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        Self {
            permit,
            _open: OpenCount(Arc::clone(open)),
        }
    }
}

/// Counts a connection in its pool's `open` while it lives.
struct OpenCount(Arc<AtomicUsize>);

impl Drop for OpenCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Passes a connection's wake-ups on to the task that uses it, and to no
/// one while it is idle. hyper's driver leaves wakers behind in the
/// socket and its channels; without the relay, the task that used the
/// connection last would be woken by what happens after it let go (the
/// next user's request, the rest of a body it already has), and a wake-up
/// of a task by itself costs the multi-thread scheduler a hand-off to
/// another worker.
#[derive(Default)]
struct WakeRelay {
    task: TaskWaker,
    /// Set when the socket wakes the driver, cleared before each drive:
    /// whether anything arrived on the socket since the driver last ran.
    socket_woken: AtomicBool,
    /// How many times the socket has woken the driver (wrapping): a read
    /// that found nothing need not be tried again until this moves.
    socket_wakes: AtomicU32,
}

/// The waker an HTTP/1.1 connection's socket is polled with: it notes
/// that the socket woke the driver, then wakes as the relay does.
struct SocketWake(Arc<WakeRelay>);

impl std::task::Wake for SocketWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.socket_wakes.fetch_add(1, Ordering::Release);
        self.0.socket_woken.store(true, Ordering::Release);
        self.0.wake_by_ref();
    }
}

/// An HTTP/1.1 connection's socket, polled with its [`SocketWake`]
/// whatever waker hyper passes (always the relay's: the driver is only
/// polled through [`Http1Conn::drive`]).
///
/// hyper reads a connection more often than anything can arrive: once
/// more after each response (which finds nothing), then before it writes
/// the next request and again after writing it. After a read that found
/// nothing, the socket's wake-up stays registered with the runtime until
/// the socket is ready again, and it is always the same one, so until it
/// fires another read would find nothing too: it is answered `Pending`
/// here without asking the runtime (whose answer takes a lock on the
/// socket's waiters).
struct WatchedIo {
    io: UpstreamIo,
    waker: Waker,
    relay: Arc<WakeRelay>,
    /// After a read that found nothing: the relay's `socket_wakes` as it
    /// was before that read.
    parked_at: Option<u32>,
}

impl WatchedIo {
    fn new(io: UpstreamIo, relay: &Arc<WakeRelay>) -> Self {
        Self {
            io,
            waker: Waker::from(Arc::new(SocketWake(Arc::clone(relay)))),
            relay: Arc::clone(relay),
            parked_at: None,
        }
    }
}

impl hyper::rt::Read for WatchedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        // Read before the attempt: a wake-up that comes while the runtime
        // registers the waker moves it, and the next read is tried.
        let wakes = this.relay.socket_wakes.load(Ordering::Acquire);
        if this.parked_at == Some(wakes) {
            return Poll::Pending;
        }
        let read = Pin::new(&mut this.io).poll_read(&mut Context::from_waker(&this.waker), buf);
        this.parked_at = read.is_pending().then_some(wakes);
        read
    }
}

impl hyper::rt::Write for WatchedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        Pin::new(&mut this.io).poll_write(&mut Context::from_waker(&this.waker), buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        Pin::new(&mut this.io).poll_write_vectored(&mut Context::from_waker(&this.waker), bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        Pin::new(&mut this.io).poll_flush(&mut Context::from_waker(&this.waker))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        Pin::new(&mut this.io).poll_shutdown(&mut Context::from_waker(&this.waker))
    }
}

impl std::task::Wake for WakeRelay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.task.wake();
    }
}

impl<B: Body + 'static> Http1Conn<B> {
    /// Closes the connection and keeps its place under the cap.
    fn close_keeping_place(self) -> OwnedSemaphorePermit {
        let Self {
            sender,
            driver,
            place,
            ..
        } = self;
        drop(driver);
        drop(sender);
        place.permit
    }
}

impl<B> Http1Conn<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// Lets the driver read and write what it can; `false` once the
    /// connection has closed.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(driver) = self.driver.as_mut() else {
            return false;
        };
        self.relay.task.set(cx.waker());
        self.relay.socket_woken.store(false, Ordering::Relaxed);
        let mut relayed = Context::from_waker(&self.relay_waker);
        match Pin::new(&mut **driver).poll(&mut relayed) {
            Poll::Pending => true,
            Poll::Ready(result) => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, protocol = "HTTP/1.1", "upstream connection ended");
                }
                // Dropping the driver answers anything still queued on it.
                self.driver = None;
                false
            }
        }
    }

    /// Whether it is open and waiting for a request, once its driver has
    /// seen what arrived while it sat idle (a close, say). Nobody is woken
    /// by it until the next user drives it. When nothing arrived on the
    /// socket since the driver last ran, it has nothing new to see and is
    /// not run: the socket registers a wake-up whenever hyper's read of it
    /// comes back empty, as the read after every response does. (Should a
    /// close slip by all the same, the request finds it and is sent again
    /// on another connection, as one that was never written.)
    fn ready_after_idle(&mut self) -> bool {
        if !self.relay.socket_woken.load(Ordering::Acquire) {
            return self.driver.is_some() && self.sender.is_ready();
        }
        let alive = self.drive(&mut Context::from_waker(Waker::noop()));
        self.relay.task.clear();
        alive && self.sender.is_ready()
    }
}

struct IdleConn<B: Body + 'static> {
    conn: Http1Conn<B>,
    since_epoch: u64,
}

/// A connection checked out for one request.
enum Checkout<B: Body + 'static> {
    Http1 {
        conn: Http1Conn<B>,
        reused: bool,
        /// It sat idle across a reaper tick: the upstream may be closing it.
        stale: bool,
    },
    Http2 {
        id: u64,
        sender: http2::SendRequest<B>,
        reused: bool,
    },
}

// === impl Lease ===

/// An HTTP/1.1 connection whose response body is still being read. The
/// body's reader polls [`Lease::drive`] before reading; the connection goes
/// back to the pool once the body has ended.
pub(crate) struct Lease<B: Body + 'static> {
    conn: Http1Conn<B>,
    pool: Weak<Inner<B>>,
}

impl<B> Lease<B>
where
    B: Body<Data = Bytes> + ReplayableBody + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// Lets the connection read more of the body.
    pub(crate) fn drive(&mut self, cx: &mut Context<'_>) {
        self.conn.drive(cx);
    }

    /// The body has ended or was dropped: the connection goes back to the
    /// pool when it is ready for another request, else a task finishes it
    /// (it closes if what is left of the body is not wanted).
    pub(crate) fn release(mut self) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        if self.conn.ready_after_idle() {
            pool.put(self.conn);
            return;
        }
        if self.conn.driver.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Bounded, so that an upstream that never finishes cannot hold a
        // place under the cap for ever.
        let limit = pool.idle_timeout.unwrap_or(MAX_TICK);
        let pool = Arc::downgrade(&pool);
        let mut conn = Some(self.conn);
        let finished = std::future::poll_fn(move |cx| {
            let c = conn.as_mut().expect("polled after completion");
            if !c.drive(cx) {
                return Poll::Ready(None);
            }
            if c.sender.is_ready() {
                Poll::Ready(conn.take())
            } else {
                Poll::Pending
            }
        });
        runtime.spawn(async move {
            if let Ok(Some(conn)) = tokio::time::timeout(limit, finished).await
                && let Some(pool) = pool.upgrade()
            {
                pool.put(conn);
            }
        });
    }
}

// === impl UpstreamPool ===

impl<B> UpstreamPool<B>
where
    B: Body<Data = Bytes> + ReplayableBody + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// A pool for `scheme://authority`, one of `group`.
    pub(crate) fn new(
        scheme: Scheme,
        authority: Authority,
        connector: HttpsConnector<HttpConnector>,
        settings: PoolSettings,
        route: Arc<str>,
        group: Arc<PoolGroup<B>>,
    ) -> Result<Self, http::Error> {
        let idle_timeout = settings.idle_timeout;
        let origin = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()?;
        let header_bytes = settings.max_response_header_bytes;
        let mut h1 = http1::Builder::new();
        // hyper's own limit is 100 fields; many upstreams send more.
        h1.max_headers(settings.max_response_headers)
            .max_header_size(header_bytes);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(header_bytes).unwrap_or(u32::MAX));
        let tick = (idle_timeout / TICKS_PER_IDLE_TIMEOUT)
            .min(MAX_TICK)
            .max(Duration::from_millis(1));
        let idle_ticks = idle_timeout.as_nanos().div_ceil(tick.as_nanos()) as u64;
        let inner = Arc::new(Inner {
            route,
            connector,
            origin,
            scheme,
            authority,
            h1,
            h2,
            idle: Mutex::new(Idle {
                conns: Vec::new(),
                waiters: VecDeque::new(),
                #[cfg(test)]
                sweeps: 0,
            }),
            open: Arc::new(AtomicUsize::new(0)),
            connecting: AtomicUsize::new(0),
            promised: AtomicUsize::new(0),
            connect_wait: settings.connect_wait.min(settings.queue_timeout),
            group: Arc::clone(&group),
            idle_timeout: (!idle_timeout.is_zero()).then_some(idle_timeout),
            tick,
            idle_ticks,
            epoch: AtomicU64::new(0),
            reaper_started: AtomicBool::new(false),
            queue_timeout: settings.queue_timeout,
            queued: AtomicUsize::new(0),
            returning: AtomicUsize::new(0),
        });
        {
            let mut pools = lock(&group.pools);
            pools.retain(|p| p.strong_count() > 0);
            pools.push(Arc::downgrade(&inner));
            group.pool_count.store(pools.len(), Ordering::Relaxed);
        }
        Ok(Self { inner })
    }

    /// Sends `request` (origin-form URI, `Host` set) on a pooled or new
    /// connection and resolves to the response head. The body streams
    /// after it: for an HTTP/1.1 connection whose response is not read to
    /// its end yet, the [`Lease`] goes with it, for the body's reader to
    /// drive and release.
    pub(crate) fn send(&self, request: Request<B>) -> SendFuture<B> {
        SendFuture {
            pool: Arc::clone(&self.inner),
            state: SendState::Checkout,
            request: Some(request),
            keep: None,
            retries: 0,
            resent: false,
        }
    }
}

// === impl SendFuture ===

/// What [`UpstreamPool::send`] resolves to.
pub(crate) type Sent<B> = Result<(Response<Incoming>, Option<Lease<B>>), PoolError>;

/// Response future of [`UpstreamPool::send`].
///
/// An HTTP/1.1 connection's driver is polled here, in the caller's task,
/// before its answer is; the answer can only arrive through those polls, so
/// it is polled with a waker that wakes no one, which spares the task a
/// wake-up by itself.
pub(crate) struct SendFuture<B: Body + 'static> {
    pool: Arc<Inner<B>>,
    state: SendState<B>,
    /// The request, until it is handed to a connection.
    request: Option<Request<B>>,
    /// A copy kept for the keep-alive race (see the module docs). Boxed:
    /// it is rarely made, and in place it would make every request's
    /// future 248 bytes larger (written to fresh memory on each request).
    keep: Option<Box<Request<B>>>,
    retries: usize,
    /// Set once a request lost on a stale connection is sent again: it then
    /// goes out on a new connection, and only once.
    resent: bool,
}

enum SendState<B: Body + 'static> {
    Checkout,
    Connecting(Connecting<B>),
    Http1 {
        /// `None` once the connection has closed.
        conn: Option<Http1Conn<B>>,
        promise: Promise<B>,
        reused: bool,
    },
    Http2 {
        id: u64,
        promise: Promise<B>,
        reused: bool,
    },
    Done,
}

impl<B: Body + 'static> fmt::Debug for SendFuture<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendFuture").finish_non_exhaustive()
    }
}

impl<B> SendFuture<B>
where
    B: Body<Data = Bytes> + ReplayableBody + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// Hands the request to the connection checked out.
    fn start(&mut self, checkout: Checkout<B>) {
        let mut request = self.request.take().expect("request held until sent");
        self.state = match checkout {
            Checkout::Http1 {
                mut conn,
                reused,
                stale,
            } => {
                if stale && !self.resent {
                    self.keep = copy_if_idempotent(&request).map(Box::new);
                }
                let promise = tokio::task::unconstrained(Box::pin(
                    conn.sender.try_send_request(request),
                ) as Pin<Box<_>>);
                SendState::Http1 {
                    conn: Some(conn),
                    promise,
                    reused,
                }
            }
            Checkout::Http2 {
                id,
                mut sender,
                reused,
            } => {
                self.pool.to_absolute_form(&mut request);
                let promise = tokio::task::unconstrained(
                    Box::pin(sender.try_send_request(request)) as Pin<Box<_>>,
                );
                SendState::Http2 {
                    id,
                    promise,
                    reused,
                }
            }
        };
    }

    /// After a failed exchange: whether the request goes out again (the
    /// state is then back at checkout), or the error to answer with.
    fn retry_or_fail(
        &mut self,
        mut e: TrySendError<Request<B>>,
        reused: bool,
    ) -> Option<PoolError> {
        match e.take_message() {
            // Never written: safe to send again, if the connection was an
            // old one that went away.
            Some(mut unsent) if reused && self.retries < MAX_UNSENT_RETRIES => {
                tracing::debug!(
                    error = %e.error(),
                    "pooled upstream connection was closed; sending on another"
                );
                self.retries += 1;
                // An HTTP/2 request carries an absolute URI by now;
                // HTTP/1.1 wants origin-form again.
                let origin_form = unsent.uri().path_and_query().cloned().map(Uri::from);
                if let Some(uri) = origin_form {
                    *unsent.uri_mut() = uri;
                }
                self.request = Some(unsent);
            }
            _ => match self.keep.take() {
                Some(copy) => {
                    tracing::debug!(
                        error = %e.error(),
                        "idle upstream connection failed before answering; \
                         sending the idempotent request again on a new one"
                    );
                    self.resent = true;
                    self.request = Some(*copy);
                }
                None => return Some(PoolError::Request(e.into_error())),
            },
        }
        self.state = SendState::Checkout;
        None
    }
}

impl<B> Future for SendFuture<B>
where
    B: Body<Data = Bytes> + ReplayableBody + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Output = Sent<B>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                SendState::Checkout => {
                    let idle = if this.resent {
                        None
                    } else {
                        this.pool.take_idle()
                    };
                    match idle {
                        Some(checkout) => this.start(checkout),
                        // Boxed: the handshake futures are large.
                        None => {
                            this.state = SendState::Connecting(Box::pin(
                                Arc::clone(&this.pool).connect_or_wait(!this.resent),
                            ));
                        }
                    }
                }
                SendState::Connecting(connecting) => match ready!(connecting.as_mut().poll(cx)) {
                    Ok(checkout) => this.start(checkout),
                    Err(e) => {
                        this.state = SendState::Done;
                        return Poll::Ready(Err(e));
                    }
                },
                SendState::Http1 {
                    conn,
                    promise,
                    reused,
                } => {
                    let alive = conn.as_mut().is_some_and(|c| c.drive(cx));
                    if !alive {
                        // Closed: dropping the driver answers the promise.
                        *conn = None;
                    }
                    // Only this task's polls of the driver (or its drop)
                    // answer the promise; while the driver lives, it holds
                    // the wake-up.
                    let result = if alive {
                        let mut quiet = Context::from_waker(Waker::noop());
                        Pin::new(promise).poll(&mut quiet)
                    } else {
                        Pin::new(promise).poll(cx)
                    };
                    match ready!(result) {
                        Ok(response) => {
                            let lease = conn.take().and_then(|conn| this.pool.finish(conn));
                            this.state = SendState::Done;
                            return Poll::Ready(Ok((response, lease)));
                        }
                        Err(e) => {
                            let reused = *reused;
                            *conn = None;
                            if let Some(error) = this.retry_or_fail(e, reused) {
                                this.state = SendState::Done;
                                return Poll::Ready(Err(error));
                            }
                        }
                    }
                }
                SendState::Http2 {
                    id,
                    promise,
                    reused,
                } => match ready!(Pin::new(promise).poll(cx)) {
                    Ok(response) => {
                        this.state = SendState::Done;
                        return Poll::Ready(Ok((response, None)));
                    }
                    Err(e) => {
                        if e.message().is_some() {
                            // Refused before it started (GOAWAY, closing):
                            // the next request gets a new connection.
                            this.pool.group.forget_h2(*id);
                        }
                        let reused = *reused;
                        if let Some(error) = this.retry_or_fail(e, reused) {
                            this.state = SendState::Done;
                            return Poll::Ready(Err(error));
                        }
                    }
                },
                SendState::Done => panic!("SendFuture polled after completion"),
            }
        }
    }
}

// === impl Inner ===

impl<B> Inner<B>
where
    B: Body<Data = Bytes> + ReplayableBody + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// A live idle connection, or the shared HTTP/2 one, if there is one.
    fn take_idle(&self) -> Option<Checkout<B>> {
        if let Some(shared) = self.shared_h2() {
            return Some(shared);
        }
        loop {
            // One at a time, the lock not held while the driver runs.
            let idle = lock(&self.idle).conns.pop()?;
            if let Some(checkout) = self.check_out(idle) {
                return Some(checkout);
            }
        }
    }

    /// The group's HTTP/2 connection, once the upstream speaks h2.
    fn shared_h2(&self) -> Option<Checkout<B>> {
        if !self.group.prefers_h2.load(Ordering::Relaxed) {
            return None;
        }
        let (id, sender) = self.group.live_h2()?;
        Some(Checkout::Http2 {
            id,
            sender,
            reused: true,
        })
    }

    /// `idle`, if it is still open; one the upstream closed while it was
    /// idle is dropped here.
    fn check_out(&self, mut idle: IdleConn<B>) -> Option<Checkout<B>> {
        idle.conn.ready_after_idle().then(|| Checkout::Http1 {
            conn: idle.conn,
            reused: true,
            stale: idle.since_epoch != self.epoch.load(Ordering::Relaxed),
        })
    }

    /// The response head is in: a connection whose response has been read
    /// whole (a small one arrives in one read) goes back to the pool at
    /// once; else the body's reader gets it as a [`Lease`].
    fn finish(self: &Arc<Self>, conn: Http1Conn<B>) -> Option<Lease<B>> {
        if conn.sender.is_ready() {
            self.put(conn);
            return None;
        }
        conn.driver.as_ref()?;
        Some(Lease {
            conn,
            pool: Arc::downgrade(self),
        })
    }

    /// A new connection when fewer than `max_connections` are open in the
    /// group; else the first that comes back to this pool, or a new one
    /// once another closes (an idle one of another pool is closed for it),
    /// waiting at most `queue_timeout`.
    ///
    /// Beyond the pool's share of the group's `wait_above`, and below the
    /// cap, a request that may take a used connection (`may_reuse`) first
    /// waits up to `connect_wait` for one to come back, and opens one only
    /// then. At the cap it waits as before.
    async fn connect_or_wait(self: Arc<Self>, may_reuse: bool) -> Result<Checkout<B>, PoolError> {
        if may_reuse
            && self.waits_before_connecting()
            && self.group.permits.available_permits() > 0
            && let Some(checkout) = self.wait_for_return().await
        {
            return checkout;
        }
        if let Ok(permit) = Arc::clone(&self.group.permits).try_acquire_owned() {
            return Box::pin(self.connect(permit)).await;
        }
        let deadline = tokio::time::Instant::now() + self.queue_timeout;
        // Counted as queued before looking, so that a connection another
        // pool takes back after this look is closed there (`put`).
        let _queued = Queued::count(&self.queued, &self.group.queued);
        loop {
            if let Some(shared) = self.shared_h2() {
                return Ok(shared);
            }
            let (handover, mut handed) = oneshot::channel();
            // Looked for and queued under one lock: a connection that comes
            // back after the look is handed over, not left idle.
            let found = {
                let mut idle = lock(&self.idle);
                let found = idle.conns.pop();
                if found.is_none() {
                    idle.enqueue(handover, self.waiting());
                }
                found
            };
            if let Some(found) = found {
                match self.check_out(found) {
                    Some(checkout) => return Ok(checkout),
                    None => continue,
                }
            }
            self.group.close_idle_elsewhere(&self);
            tokio::select! {
                biased;
                handed = &mut handed => {
                    // `put` and `take_place` send on a handover they take
                    // or get what they sent back; an error cannot come,
                    // and would only mean looking again.
                    if let Ok(handed) = handed {
                        return self.take_handed(handed).await;
                    }
                }
                permit = Arc::clone(&self.group.permits).acquire_owned() => {
                    // The semaphore is never closed.
                    let permit = permit.map_err(|e| PoolError::Connect(e.into()))?;
                    // Out of the queue first: a connection that comes back
                    // while this one connects goes to the next waiting
                    // request, not into a channel no one reads. One handed
                    // over in the same instant is used, and the place goes
                    // back; of two places, one goes back.
                    handed.close();
                    if let Ok(Handed::Conn(conn)) = handed.try_recv() {
                        return Ok(handed_over(conn));
                    }
                    // Boxed: the handshake's state would otherwise make
                    // every wait as large as a connect.
                    return Box::pin(self.connect(permit)).await;
                }
                () = tokio::time::sleep_until(deadline) => {
                    handed.close();
                    if let Ok(handed) = handed.try_recv() {
                        return self.take_handed(handed).await;
                    }
                    tracing::debug!(
                        waited_ms = self.queue_timeout.as_millis() as u64,
                        "every upstream connection stayed busy"
                    );
                    return Err(PoolError::Saturated(self.queue_timeout));
                }
            }
        }
    }

    /// A connection handed over, or one opened in a place handed over.
    async fn take_handed(self: &Arc<Self>, handed: Handed<B>) -> Result<Checkout<B>, PoolError> {
        match handed {
            Handed::Conn(conn) => Ok(handed_over(conn)),
            // Boxed: the handshake's state would otherwise make every wait
            // as large as a connect.
            Handed::Place(place) => Box::pin(self.connect(place.redeem())).await,
        }
    }

    /// Whether this pool, with every connection busy, already holds (or is
    /// opening) its share of the group's `wait_above`, so that a request
    /// waits for a connection to come back before opening another.
    fn waits_before_connecting(&self) -> bool {
        if self.connect_wait.is_zero() || self.group.prefers_h2.load(Ordering::Relaxed) {
            return false;
        }
        let pools = self.group.pool_count.load(Ordering::Relaxed).max(1);
        self.held() * pools >= self.group.wait_above
    }

    /// A connection of this pool that comes back (or sits idle) within
    /// `connect_wait`, if one does. The request waits in the pool's queue
    /// like one at the cap, but is not counted as one: no other pool closes
    /// a connection for it.
    async fn wait_for_return(self: &Arc<Self>) -> Option<Result<Checkout<B>, PoolError>> {
        let (handover, mut handed) = oneshot::channel();
        // Counted before it is queued, so that the queue is swept of
        // requests that stopped waiting only when most of its entries are
        // theirs, not on every request while many wait here.
        let returning = Counting::start(&self.returning);
        let found = {
            let mut idle = lock(&self.idle);
            let found = idle.conns.pop();
            if found.is_none() {
                idle.enqueue(handover, self.waiting());
            }
            found
        };
        if let Some(found) = found {
            return self.check_out(found).map(Ok);
        }
        let handed = match tokio::time::timeout(self.connect_wait, &mut handed).await {
            Ok(Ok(handed)) => handed,
            _ => {
                handed.close();
                let Ok(late) = handed.try_recv() else {
                    tracing::debug!(
                        waited_ms = self.connect_wait.as_millis() as u64,
                        "no upstream connection came back; opening another"
                    );
                    return None;
                };
                late
            }
        };
        drop(returning);
        Some(self.take_handed(handed).await)
    }

    /// A new connection: TCP (and TLS), then the HTTP/1.1 or HTTP/2
    /// handshake that ALPN chose. An HTTP/2 connection's driver is spawned
    /// (the connection is shared); an HTTP/1.1 one's runs where the
    /// connection is used. `permit` is held for as long as the connection
    /// is open.
    async fn connect(
        self: &Arc<Self>,
        permit: OwnedSemaphorePermit,
    ) -> Result<Checkout<B>, PoolError> {
        let _opening = Counting::start(&self.connecting);
        let group = &self.group;
        let _one_at_a_time = if group.prefers_h2.load(Ordering::Relaxed) {
            let guard = group.h2_connecting.lock().await;
            // Someone else may have connected while we waited.
            if let Some((id, sender)) = group.live_h2() {
                return Ok(Checkout::Http2 {
                    id,
                    sender,
                    reused: true,
                });
            }
            Some(guard)
        } else {
            None
        };
        let mut connector = self.connector.clone();
        let io = connector
            .call(self.origin.clone())
            .await
            .map_err(PoolError::Connect)?;
        self.start_reaper();
        if io.connected().is_negotiated_h2() {
            let (mut sender, conn) = self
                .h2
                .handshake(io)
                .await
                .map_err(|e| PoolError::Connect(e.into()))?;
            drive_http2(conn, permit);
            sender
                .ready()
                .await
                .map_err(|e| PoolError::Connect(e.into()))?;
            group.prefers_h2.store(true, Ordering::Relaxed);
            metrics::counter!(metric_names::UPSTREAM_CONNECTIONS_OPENED_TOTAL.name, "route" => Arc::clone(&self.route), "protocol" => "http2").increment(1);
            let id = group.h2_opened.fetch_add(1, Ordering::Relaxed);
            let mut shared = lock(&group.shared_h2);
            if shared.as_ref().is_none_or(|(_, s)| s.is_closed()) {
                *shared = Some((id, sender.clone()));
            }
            Ok(Checkout::Http2 {
                id,
                sender,
                reused: false,
            })
        } else {
            let relay = Arc::new(WakeRelay::default());
            let (sender, driver) = self
                .h1
                .handshake(WatchedIo::new(io, &relay))
                .await
                .map_err(|e| PoolError::Connect(e.into()))?;
            metrics::counter!(metric_names::UPSTREAM_CONNECTIONS_OPENED_TOTAL.name, "route" => Arc::clone(&self.route), "protocol" => "http1").increment(1);
            Ok(Checkout::Http1 {
                conn: Http1Conn {
                    sender,
                    driver: Some(Box::new(driver)),
                    relay_waker: Waker::from(Arc::clone(&relay)),
                    relay,
                    place: Place::new(permit, &self.open),
                },
                reused: false,
                stale: false,
            })
        }
    }

    /// A connection ready for another request: closed if another pool
    /// whose requests wait is owed it (its place then goes to that pool's
    /// request that has waited longest), else to the request of this pool
    /// that has waited longest, else into the idle stack.
    fn put(&self, mut conn: Http1Conn<B>) {
        conn.relay.task.clear();
        let group = &self.group;
        loop {
            let mut idle = lock(&self.idle);
            // Decided under the lock: a request of another pool that starts
            // waiting after this look finds the connection in the stack
            // (`close_idle_elsewhere`).
            let owed = if group.queued.load(Ordering::SeqCst) > self.queued.load(Ordering::SeqCst) {
                group.owed_elsewhere(self)
            } else {
                None
            };
            if let Some(there) = owed {
                drop(idle);
                there.take_place(conn.close_keeping_place());
                return;
            }
            if let Some(waiter) = idle.waiters.pop_front() {
                drop(idle);
                match waiter.send(Handed::Conn(conn)) {
                    Ok(()) => return,
                    // It stopped waiting: the next one, if any.
                    Err(Handed::Conn(back)) => {
                        conn = back;
                        continue;
                    }
                    // What comes back is what was sent.
                    Err(Handed::Place(_)) => return,
                }
            }
            if self.idle_timeout.is_none() {
                drop(idle);
                drop(conn);
                return;
            }
            idle.conns.push(IdleConn {
                conn,
                since_epoch: self.epoch.load(Ordering::Relaxed),
            });
            return;
        }
    }

    fn to_absolute_form(&self, request: &mut Request<B>) {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = request.uri().path_and_query().cloned();
        if let Ok(uri) = Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }

    /// Starts the idle reaper with the first connection (a runtime is
    /// running by then). It stops when the pool is dropped.
    fn start_reaper(self: &Arc<Self>) {
        if self.idle_timeout.is_none() {
            return;
        }
        if self.reaper_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool: Weak<Self> = Arc::downgrade(self);
        let (period, idle_ticks) = (self.tick, self.idle_ticks);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(period);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                let Some(pool) = pool.upgrade() else { break };
                let now = pool.epoch.fetch_add(1, Ordering::Relaxed) + 1;
                let expired: Vec<IdleConn<B>> = {
                    let idle = &mut lock(&pool.idle).conns;
                    // Oldest first: stop at the first that is still young.
                    let keep_from = idle
                        .iter()
                        .position(|c| now - c.since_epoch <= idle_ticks)
                        .unwrap_or(idle.len());
                    idle.drain(..keep_from).collect()
                };
                // Sampled here rather than on every checkout and return;
                // over the group, so that every pool's reaper sets the same.
                metrics::gauge!(metric_names::UPSTREAM_CONNECTIONS_IDLE.name, "route" => Arc::clone(&pool.route))
                    .set(pool.group.idle_count() as f64);
                if !expired.is_empty() {
                    tracing::trace!(closed = expired.len(), "idle upstream connections closed");
                }
            }
        });
    }
}

/// A copy of `request` to send again, if it is idempotent (RFC 9110
/// §9.2.2) and its body is held in memory.
fn copy_if_idempotent<B: ReplayableBody>(request: &Request<B>) -> Option<Request<B>> {
    let idempotent = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    if !idempotent {
        return None;
    }
    let body = request.body().try_clone()?;
    let mut copy = Request::new(body);
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    Some(copy)
}

/// Whether pool `there` should give one of its HTTP/1.1 connections up (by
/// closing it) to a request that waits in pool `here`: when `here` holds
/// none, or two fewer. The places under the cap thus follow the requests
/// from core to core, and two pools that both have requests waiting keep
/// their connections (a connection passes between the pools only by being
/// closed and another opened). What a pool holds ([`Inner::held`])
/// includes the connections it is opening and the places promised to it:
/// counting only open ones, a pool whose new connection is still being
/// opened would look owed another, and get it, and then owe one back.
fn owes<B: Body + 'static>(there: &Inner<B>, here: &Inner<B>) -> bool {
    let mine = here.held();
    mine == 0 || mine + 1 < there.held()
}

/// Counts something (a connection being opened, a request waiting) while
/// it lives.
struct Counting<'a>(&'a AtomicUsize);

impl<'a> Counting<'a> {
    fn start(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Counting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection a returning request handed to one that waited for it.
fn handed_over<B: Body + 'static>(conn: Http1Conn<B>) -> Checkout<B> {
    Checkout::Http1 {
        conn,
        reused: true,
        stale: false,
    }
}

/// Runs a shared HTTP/2 connection's driver until the connection closes,
/// then gives its place under the cap back.
fn drive_http2<C>(conn: C, permit: OwnedSemaphorePermit)
where
    C: Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, protocol = "HTTP/2", "upstream connection ended");
        }
        drop(permit);
    });
}

/// Counts a request as waiting for a connection, in its pool and in the
/// group, while it lives.
struct Queued<'a> {
    pool: &'a AtomicUsize,
    group: &'a AtomicUsize,
}

impl<'a> Queued<'a> {
    /// In this order, and the reverse on drop, so that the group's count is
    /// never seen below the pool's: a single pool never closes a
    /// connection it takes back for its own waiters.
    fn count(pool: &'a AtomicUsize, group: &'a AtomicUsize) -> Self {
        pool.fetch_add(1, Ordering::SeqCst);
        group.fetch_add(1, Ordering::SeqCst);
        Self { pool, group }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.group.fetch_sub(1, Ordering::SeqCst);
        self.pool.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A poisoned lock only means a panic elsewhere while it was held; the
/// vectors it guards are always in a usable state.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;

    type Conn = Handed<Empty<Bytes>>;

    fn queue() -> Idle<Empty<Bytes>> {
        Idle {
            conns: Vec::new(),
            waiters: VecDeque::new(),
            sweeps: 0,
        }
    }

    fn live(idle: &Idle<Empty<Bytes>>) -> usize {
        idle.waiters.iter().filter(|w| !w.is_closed()).count()
    }

    #[test]
    fn requests_that_hang_up_behind_a_waiting_one_do_not_pile_up_in_the_queue() {
        let mut idle = queue();
        // The oldest request keeps waiting; a flood of others queue behind
        // it and leave at once, as clients that hang up at the cap do.
        let (first, _first_waits) = oneshot::channel::<Conn>();
        idle.enqueue(first, 1);
        let mut longest = 0;
        for _ in 0..10_000 {
            let (handover, handed) = oneshot::channel::<Conn>();
            idle.enqueue(handover, 2);
            longest = longest.max(idle.waiters.len());
            drop(handed);
        }
        assert!(
            longest <= 2 * 2 + SWEEP_SLACK + 1,
            "the queue grew to {longest} entries for 2 waiting requests"
        );
        // The request that waits is still first in line.
        assert!(!idle.waiters.front().expect("queued").is_closed());
        assert_eq!(live(&idle), 1);
    }

    #[test]
    fn a_sweep_keeps_every_request_that_still_waits_in_its_order() {
        let mut idle = queue();
        let mut waiting = Vec::new();
        // Every third request stays; the others leave.
        for i in 0..300 {
            let (handover, handed) = oneshot::channel::<Conn>();
            let still_waiting = waiting.len() + 1;
            idle.enqueue(handover, still_waiting);
            if i % 3 == 0 {
                waiting.push(handed);
            }
        }
        assert_eq!(live(&idle), waiting.len());
        assert!(idle.waiters.len() <= 2 * waiting.len() + SWEEP_SLACK + 1);
        // Served oldest first: closing the requests in the order they came
        // always closes the queue's first live entry.
        for mut handed in waiting {
            let front = idle
                .waiters
                .iter()
                .position(|w| !w.is_closed())
                .expect("a live entry");
            handed.close();
            assert!(idle.waiters[front].is_closed());
        }
        assert_eq!(live(&idle), 0);
    }

    #[test]
    fn dead_entries_at_the_front_go_at_once() {
        let mut idle = queue();
        for _ in 0..5 {
            let (handover, handed) = oneshot::channel::<Conn>();
            idle.enqueue(handover, 1);
            drop(handed);
        }
        let (handover, _handed) = oneshot::channel::<Conn>();
        idle.enqueue(handover, 1);
        assert_eq!(idle.waiters.len(), 1);
    }

    /// A request the test upstream holds: the number of the connection it
    /// came on, its path, and what answers it.
    type Held = (usize, String, oneshot::Sender<()>);

    /// An HTTP/1.1 upstream that numbers its connections and answers each
    /// request (`200`, empty) only when the test says so.
    async fn holding_upstream() -> (Authority, tokio::sync::mpsc::UnboundedReceiver<Held>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string().parse().unwrap();
        let (held, requests) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for number in 0.. {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let held = held.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match socket.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                        buf.drain(..end + 4);
                        let path = head.split(' ').nth(1).unwrap_or_default().to_owned();
                        let (answer, answered) = oneshot::channel();
                        if held.send((number, path, answer)).is_err() || answered.await.is_err() {
                            return;
                        }
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                        if socket.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (authority, requests)
    }

    fn pool_of(
        group: &Arc<PoolGroup<Empty<Bytes>>>,
        upstream: &Authority,
    ) -> UpstreamPool<Empty<Bytes>> {
        pool_with(
            group,
            upstream,
            PoolSettings {
                queue_timeout: Duration::from_secs(30),
                ..PoolSettings::default()
            },
        )
    }

    fn pool_with(
        group: &Arc<PoolGroup<Empty<Bytes>>>,
        upstream: &Authority,
        settings: PoolSettings,
    ) -> UpstreamPool<Empty<Bytes>> {
        let connector = crate::tls::https_connector(
            crate::tls::client_config(None).unwrap(),
            Duration::from_secs(5),
        );
        UpstreamPool::new(
            Scheme::HTTP,
            upstream.clone(),
            connector,
            settings,
            Arc::from("test"),
            Arc::clone(group),
        )
        .unwrap()
    }

    fn get(pool: &UpstreamPool<Empty<Bytes>>, path: &str) -> tokio::task::JoinHandle<u16> {
        let request = Request::get(path)
            .header(http::header::HOST, "upstream")
            .body(Empty::new())
            .unwrap();
        let sent = pool.send(request);
        tokio::spawn(async move { sent.await.unwrap().0.status().as_u16() })
    }

    /// Lets the other tasks run until `pool` has `n` requests waiting at
    /// the cap.
    async fn until_queued(pool: &UpstreamPool<Empty<Bytes>>, n: usize) {
        while pool.inner.queued.load(Ordering::SeqCst) != n {
            tokio::task::yield_now().await;
        }
    }

    /// A place promised to requests that stopped waiting, before or after
    /// it was sent to them, goes back to the cap, and the pool no longer
    /// counts it: a promise that outlived its request would make the pool
    /// look as if it held a connection it does not.
    #[tokio::test]
    async fn a_place_promised_to_requests_that_left_goes_back_to_the_cap() {
        let (upstream, _held) = holding_upstream().await;
        let group = PoolGroup::new(1, 1024);
        let pool = pool_of(&group, &upstream);
        let promised = || pool.inner.promised.load(Ordering::SeqCst);
        let place = || Arc::clone(&group.permits).try_acquire_owned().unwrap();

        // Nobody waits.
        pool.inner.take_place(place());
        assert_eq!((promised(), group.permits.available_permits()), (0, 1));

        // The first request left before the place came; the second takes
        // it, and then leaves without reading it.
        let (left_before, gone) = oneshot::channel();
        let (left_after, handed) = oneshot::channel();
        {
            let mut idle = lock(&pool.inner.idle);
            idle.waiters.push_back(left_before);
            idle.waiters.push_back(left_after);
        }
        drop(gone);
        pool.inner.take_place(place());
        assert_eq!((promised(), group.permits.available_permits()), (1, 0));
        assert!(lock(&pool.inner.idle).waiters.is_empty());
        drop(handed);
        assert_eq!((promised(), group.permits.available_permits()), (0, 1));
    }

    /// A read that found nothing is answered `Pending` without asking the
    /// runtime until the socket wakes, and what arrives after it is read:
    /// no wake-up is lost to the shortcut.
    #[tokio::test]
    async fn a_read_that_found_nothing_is_tried_again_once_the_socket_wakes() {
        use hyper::rt::Read as _;
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut peer, _) = listener.accept().await.unwrap();
        let relay = Arc::new(WakeRelay::default());
        let mut io = WatchedIo::new(MaybeHttpsStream::Http(TokioIo::new(ours)), &relay);
        let mut storage = [0u8; 16];
        let mut read = |cx: &mut Context<'_>| {
            relay.task.set(cx.waker());
            let mut buf = hyper::rt::ReadBuf::new(&mut storage);
            let polled = Pin::new(&mut io).poll_read(cx, buf.unfilled());
            (polled.map(Result::unwrap), buf.filled().to_vec())
        };

        // Nothing sent yet: the first read asks the socket, the second is
        // answered from memory, and neither wakes anyone.
        let parked = std::future::poll_fn(|cx| {
            let first = read(cx);
            let second = read(cx);
            Poll::Ready((first, second))
        })
        .await;
        assert_eq!(parked, ((Poll::Pending, vec![]), (Poll::Pending, vec![])));
        assert_eq!(relay.socket_wakes.load(Ordering::Acquire), 0);

        // Once the peer writes, the socket's wake-up reaches this task
        // through the relay, and the read that follows gets the bytes.
        peer.write_all(b"late").await.unwrap();
        let got = tokio::time::timeout(
            Duration::from_secs(10),
            std::future::poll_fn(|cx| match read(cx) {
                (Poll::Ready(()), bytes) => Poll::Ready(bytes),
                (Poll::Pending, _) => Poll::Pending,
            }),
        )
        .await
        .expect("the socket's wake-up was lost");
        assert_eq!(got, b"late");
        assert!(relay.socket_wakes.load(Ordering::Acquire) >= 1);
    }

    /// Two pools share a cap of 2. Pool `a` holds both places and has a
    /// request waiting; then a request of pool `b` waits too. When one of
    /// `a`'s connections comes back, `a` owes `b` (which holds none): it
    /// closes the connection, and the place goes to `b`'s request, although
    /// `a`'s request has waited longer for the cap. (Let go to the cap, the
    /// place went to the request that waited longest, `a`'s, which opened a
    /// connection again, and `a` gave the next one up again: a connection
    /// opened for each request while both cores had requests waiting.)
    #[tokio::test]
    async fn a_place_given_up_for_another_pool_goes_to_its_request_not_back_to_the_giver() {
        tokio::time::timeout(Duration::from_secs(20), async {
            let (upstream, mut held) = holding_upstream().await;
            let group = PoolGroup::new(2, 1024);
            let (a, b) = (pool_of(&group, &upstream), pool_of(&group, &upstream));
            let first = get(&a, "/a/1");
            let second = get(&a, "/a/2");
            let mut open = vec![held.recv().await.unwrap(), held.recv().await.unwrap()];
            open.sort_by_key(|(_, path, _)| path.clone());
            let third = get(&a, "/a/3");
            until_queued(&a, 1).await;
            let fourth = get(&b, "/b/4");
            until_queued(&b, 1).await;

            let (_, _, answer) = open.remove(0);
            answer.send(()).unwrap();
            assert_eq!(first.await.unwrap(), 200);
            let (number, path, answer_b) = held.recv().await.unwrap();
            assert_eq!(
                (number, path.as_str()),
                (2, "/b/4"),
                "the third connection's request"
            );
            assert_eq!(
                a.inner.queued.load(Ordering::SeqCst),
                1,
                "a's request still waits"
            );
            assert_eq!(b.inner.promised.load(Ordering::SeqCst), 0);

            // `a`'s other connection, when it comes back, serves `a`'s
            // request: nothing is owed any more.
            let (second_conn, _, answer) = open.remove(0);
            answer.send(()).unwrap();
            assert_eq!(second.await.unwrap(), 200);
            let (number, path, answer_a) = held.recv().await.unwrap();
            assert_eq!((number, path.as_str()), (second_conn, "/a/3"));
            answer_a.send(()).unwrap();
            answer_b.send(()).unwrap();
            assert_eq!(third.await.unwrap(), 200);
            assert_eq!(fourth.await.unwrap(), 200);
            assert!(
                held.try_recv().is_err(),
                "no other request reached the upstream"
            );
        })
        .await
        .expect("the requests were answered");
    }

    /// Requests that wait for a busy connection to come back (beyond
    /// `wait_above`, for up to `connect_wait`) are counted as waiting when
    /// the queue decides whether to sweep out requests that stopped: while
    /// they all still wait, nothing is swept. Counted as one waiting
    /// request whatever their number, every request past the first 18
    /// swept the whole queue, one look at each entry, so that queueing
    /// cost as much as the queue was long (about 0.4 µs a request at 512
    /// client connections). Served oldest first on the one connection.
    #[tokio::test]
    async fn requests_waiting_for_a_connection_to_come_back_do_not_sweep_the_queue_each_time() {
        const WAITING: usize = 60;
        tokio::time::timeout(Duration::from_secs(20), async {
            let (upstream, mut held) = holding_upstream().await;
            let group = PoolGroup::new(1024, 1);
            let pool = pool_with(
                &group,
                &upstream,
                PoolSettings {
                    queue_timeout: Duration::from_secs(30),
                    connect_wait: Duration::from_secs(30),
                    ..PoolSettings::default()
                },
            );
            let first = get(&pool, "/0");
            let (number, path, answer) = held.recv().await.unwrap();
            assert_eq!((number, path.as_str()), (0, "/0"));
            let mut waiting = Vec::new();
            for i in 1..=WAITING {
                waiting.push(get(&pool, &format!("/{i}")));
                // Queued in the order sent.
                while pool.inner.returning.load(Ordering::SeqCst) != i {
                    tokio::task::yield_now().await;
                }
            }
            {
                let idle = lock(&pool.inner.idle);
                assert_eq!(idle.waiters.len(), WAITING);
                assert_eq!(
                    idle.sweeps, 0,
                    "the queue was swept while every entry waited"
                );
            }
            assert_eq!(pool.inner.waiting(), WAITING);
            assert_eq!(
                pool.inner.queued.load(Ordering::SeqCst),
                0,
                "none is at the cap"
            );

            answer.send(()).unwrap();
            assert_eq!(first.await.unwrap(), 200);
            for (i, request) in waiting.into_iter().enumerate() {
                let (number, path, next) = held.recv().await.unwrap();
                assert_eq!(
                    (number, path),
                    (0, format!("/{}", i + 1)),
                    "served oldest first, on the connection that came back"
                );
                next.send(()).unwrap();
                assert_eq!(request.await.unwrap(), 200);
            }
            assert_eq!(pool.inner.waiting(), 0);
            assert!(
                held.try_recv().is_err(),
                "no other request reached the upstream"
            );
        })
        .await
        .expect("the requests were answered");
    }
}
