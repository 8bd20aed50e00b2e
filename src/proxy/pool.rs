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
//! - At most `max_connections` are open at once (idle ones included). A
//!   request that finds none idle and the cap reached waits for the first
//!   connection to come back or close, at most `queue_timeout`; then it
//!   fails with [`PoolError::Saturated`] (the proxy answers `503`). Envoy's
//!   circuit breaker caps connections the same way (1024 by default).
//! - Response heads may have up to `max_response_headers` fields and
//!   `max_response_header_bytes` bytes (HTTP/1.1), or a header list of that
//!   many bytes (HTTP/2), so that a healthy upstream with a large head is
//!   not turned into a `502`.
//!
//! Metrics: `sso_token_proxy_upstream_connections_opened_total{protocol}`
//! (`http1`, `http2`), and `sso_token_proxy_upstream_connections_idle`,
//! the idle HTTP/1.1 connections, sampled at each reaper tick.

use std::{
    error::Error as StdError,
    fmt,
    future::Future,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
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
    client::conn::{http1, http2},
};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::connect::{Connection as _, HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tower::Service as _;

use crate::layer::ReplayableBody;
use crate::metric_names;

type BoxError = Box<dyn StdError + Send + Sync>;

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

/// How a pool keeps and limits its connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolSettings {
    /// Idle connections are closed after this; zero keeps none.
    pub(crate) idle_timeout: Duration,
    /// Connections open at once, idle ones included.
    pub(crate) max_connections: usize,
    /// How long a request waits for a connection when all are busy.
    pub(crate) queue_timeout: Duration,
    /// Header fields in an HTTP/1.1 response head.
    pub(crate) max_response_headers: usize,
    /// Bytes in a response head (HTTP/1.1) or header list (HTTP/2).
    pub(crate) max_response_header_bytes: usize,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            queue_timeout: Duration::from_secs(5),
            max_response_headers: 256,
            max_response_header_bytes: 128 * 1024,
        }
    }
}

/// Connections to one upstream. Cheap to clone.
pub(crate) struct UpstreamPool<B> {
    inner: Arc<Inner<B>>,
}

impl<B> Clone for UpstreamPool<B> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<B> fmt::Debug for UpstreamPool<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let idle = self.inner.idle.lock().map_or(0, |idle| idle.len());
        f.debug_struct("UpstreamPool")
            .field("origin", &self.inner.origin)
            .field("idle_http1", &idle)
            .finish_non_exhaustive()
    }
}

struct Inner<B> {
    /// The route's name, the `route` label of the pool's metrics.
    route: Arc<str>,
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority`, what the connector is asked for.
    origin: Uri,
    scheme: Scheme,
    authority: Authority,
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// Idle HTTP/1.1 connections, each ready for a request; the most
    /// recently used last.
    idle: Mutex<Vec<IdleConn<B>>>,
    /// The shared HTTP/2 connection, once ALPN has chosen h2, with its
    /// number.
    shared_h2: Mutex<Option<(u64, http2::SendRequest<B>)>>,
    /// Numbers HTTP/2 connections.
    h2_opened: AtomicU64,
    /// Set once the upstream has answered ALPN with h2: later connects are
    /// then made one at a time, so that one connection is shared.
    prefers_h2: AtomicBool,
    h2_connecting: tokio::sync::Mutex<()>,
    /// `None`: idle connections are not kept.
    idle_timeout: Option<Duration>,
    /// The reaper's period, and how many of its ticks make `idle_timeout`.
    tick: Duration,
    idle_ticks: u64,
    /// The reaper's tick count; idle connections are stamped with it.
    epoch: AtomicU64,
    reaper_started: AtomicBool,
    /// One permit per open connection.
    permits: Arc<Semaphore>,
    queue_timeout: Duration,
    /// Requests waiting for a connection, and their wake-up when one comes
    /// back to the pool.
    queued: AtomicUsize,
    returned: Notify,
}

struct IdleConn<B> {
    sender: http1::SendRequest<B>,
    since_epoch: u64,
}

/// A connection checked out for one request.
enum Checkout<B> {
    Http1 {
        sender: http1::SendRequest<B>,
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

impl<B> UpstreamPool<B>
where
    B: Body<Data = Bytes> + ReplayableBody + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// A pool for `scheme://authority`.
    pub(crate) fn new(
        scheme: Scheme,
        authority: Authority,
        connector: HttpsConnector<HttpConnector>,
        settings: PoolSettings,
        route: Arc<str>,
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
        Ok(Self {
            inner: Arc::new(Inner {
                route,
                connector,
                origin,
                scheme,
                authority,
                h1,
                h2,
                idle: Mutex::new(Vec::new()),
                shared_h2: Mutex::new(None),
                h2_opened: AtomicU64::new(0),
                prefers_h2: AtomicBool::new(false),
                h2_connecting: tokio::sync::Mutex::new(()),
                idle_timeout: (!idle_timeout.is_zero()).then_some(idle_timeout),
                tick,
                idle_ticks,
                epoch: AtomicU64::new(0),
                reaper_started: AtomicBool::new(false),
                permits: Arc::new(Semaphore::new(settings.max_connections)),
                queue_timeout: settings.queue_timeout,
                queued: AtomicUsize::new(0),
                returned: Notify::new(),
            }),
        })
    }

    /// Sends `request` (origin-form URI, `Host` set) on a pooled or new
    /// connection and resolves to the response head; the body streams
    /// after it, and the connection goes back to the pool once it is read.
    pub(crate) fn send(
        &self,
        request: Request<B>,
    ) -> impl Future<Output = Result<Response<Incoming>, PoolError>> + Send + 'static {
        let inner = Arc::clone(&self.inner);
        async move {
            let mut request = request;
            let mut retries = 0;
            // Set once a request lost on a stale connection is sent again:
            // it then goes out on a new connection, and only once.
            let mut resent = false;
            loop {
                let idle = if resent { None } else { inner.take_idle() };
                let checkout = match idle {
                    Some(checkout) => checkout,
                    // Boxed: the handshake futures are large, and this
                    // future is built (and moved) for every request.
                    None => Box::pin(inner.connect_or_wait()).await?,
                };
                let mut keep = None;
                let (result, reused) = match checkout {
                    Checkout::Http1 {
                        mut sender,
                        reused,
                        stale,
                    } => {
                        if stale && !resent {
                            keep = copy_if_idempotent(&request);
                        }
                        let result = sender.try_send_request(request).await;
                        if result.is_ok() {
                            inner.release(sender);
                        }
                        (result, reused)
                    }
                    Checkout::Http2 {
                        id,
                        mut sender,
                        reused,
                    } => {
                        inner.to_absolute_form(&mut request);
                        let result = sender.try_send_request(request).await;
                        if let Err(e) = &result
                            && e.message().is_some()
                        {
                            // Refused before it started (GOAWAY, closing):
                            // the next request gets a new connection.
                            inner.forget_h2(id);
                        }
                        (result, reused)
                    }
                };
                match result {
                    Ok(response) => return Ok(response),
                    Err(mut e) => match e.take_message() {
                        // Never written: safe to send again, if the
                        // connection was an old one that went away.
                        Some(unsent) if reused && retries < MAX_UNSENT_RETRIES => {
                            tracing::debug!(
                                error = %e.error(),
                                "pooled upstream connection was closed; sending on another"
                            );
                            retries += 1;
                            request = unsent;
                            // An HTTP/2 request carries an absolute URI by
                            // now; HTTP/1.1 wants origin-form again.
                            let origin_form =
                                request.uri().path_and_query().cloned().map(Uri::from);
                            if let Some(uri) = origin_form {
                                *request.uri_mut() = uri;
                            }
                        }
                        _ => match keep {
                            Some(copy) => {
                                tracing::debug!(
                                    error = %e.error(),
                                    "idle upstream connection failed before answering; \
                                     sending the idempotent request again on a new one"
                                );
                                resent = true;
                                request = copy;
                            }
                            None => return Err(PoolError::Request(e.into_error())),
                        },
                    },
                }
            }
        }
    }
}

impl<B> Inner<B>
where
    B: Body<Data = Bytes> + ReplayableBody + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// A live idle connection, or the shared HTTP/2 one, if there is one.
    fn take_idle(&self) -> Option<Checkout<B>> {
        if self.prefers_h2.load(Ordering::Relaxed)
            && let Some((id, sender)) = self.live_h2()
        {
            return Some(Checkout::Http2 {
                id,
                sender,
                reused: true,
            });
        }
        let mut closed = Vec::new();
        let found = {
            let mut idle = lock(&self.idle);
            loop {
                match idle.pop() {
                    None => break None,
                    Some(conn) if conn.sender.is_ready() => break Some(conn),
                    // Closed by the upstream while idle.
                    Some(conn) => closed.push(conn),
                }
            }
        };
        drop(closed);
        found.map(|conn| Checkout::Http1 {
            sender: conn.sender,
            reused: true,
            stale: conn.since_epoch != self.epoch.load(Ordering::Relaxed),
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

    /// A new connection when fewer than `max_connections` are open; else
    /// the first that comes back to the pool, or a new one once another
    /// closes, waiting at most `queue_timeout`.
    async fn connect_or_wait(self: &Arc<Self>) -> Result<Checkout<B>, PoolError> {
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            return self.connect(permit).await;
        }
        let deadline = tokio::time::Instant::now() + self.queue_timeout;
        self.queued.fetch_add(1, Ordering::SeqCst);
        let _queued = Queued(&self.queued);
        loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            // Registered before looking, so a return in between wakes it.
            returned.as_mut().enable();
            if let Some(checkout) = self.take_idle() {
                return Ok(checkout);
            }
            tokio::select! {
                permit = Arc::clone(&self.permits).acquire_owned() => {
                    // The semaphore is never closed.
                    let permit = permit.map_err(|e| PoolError::Connect(e.into()))?;
                    return self.connect(permit).await;
                }
                () = &mut returned => {}
                () = tokio::time::sleep_until(deadline) => {
                    tracing::debug!(
                        waited_ms = self.queue_timeout.as_millis() as u64,
                        "every upstream connection stayed busy"
                    );
                    return Err(PoolError::Saturated(self.queue_timeout));
                }
            }
        }
    }

    /// A new connection: TCP (and TLS), then the HTTP/1.1 or HTTP/2
    /// handshake that ALPN chose, its driver spawned. `permit` is held for
    /// as long as the connection is open.
    async fn connect(
        self: &Arc<Self>,
        permit: OwnedSemaphorePermit,
    ) -> Result<Checkout<B>, PoolError> {
        let _one_at_a_time = if self.prefers_h2.load(Ordering::Relaxed) {
            let guard = self.h2_connecting.lock().await;
            // Someone else may have connected while we waited.
            if let Some((id, sender)) = self.live_h2() {
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
            drive(conn, "HTTP/2", permit);
            sender
                .ready()
                .await
                .map_err(|e| PoolError::Connect(e.into()))?;
            self.prefers_h2.store(true, Ordering::Relaxed);
            metrics::counter!(metric_names::UPSTREAM_CONNECTIONS_OPENED_TOTAL.name, "route" => Arc::clone(&self.route), "protocol" => "http2").increment(1);
            let id = self.h2_opened.fetch_add(1, Ordering::Relaxed);
            let mut shared = lock(&self.shared_h2);
            if shared.as_ref().is_none_or(|(_, s)| s.is_closed()) {
                *shared = Some((id, sender.clone()));
            }
            Ok(Checkout::Http2 {
                id,
                sender,
                reused: false,
            })
        } else {
            let (sender, conn) = self
                .h1
                .handshake(io)
                .await
                .map_err(|e| PoolError::Connect(e.into()))?;
            drive(conn, "HTTP/1.1", permit);
            metrics::counter!(metric_names::UPSTREAM_CONNECTIONS_OPENED_TOTAL.name, "route" => Arc::clone(&self.route), "protocol" => "http1").increment(1);
            Ok(Checkout::Http1 {
                sender,
                reused: false,
                stale: false,
            })
        }
    }

    /// Back to the pool once the response has been read to its end: at
    /// once when it already has (a small response arrives in one read), or
    /// else when the connection says it is ready for the next request.
    fn release(self: &Arc<Self>, mut sender: http1::SendRequest<B>) {
        if self.idle_timeout.is_none() {
            return;
        }
        if sender.is_ready() {
            self.put(sender);
        } else if !sender.is_closed() {
            let pool = Arc::downgrade(self);
            tokio::spawn(async move {
                if sender.ready().await.is_ok()
                    && let Some(pool) = pool.upgrade()
                {
                    pool.put(sender);
                }
            });
        }
    }

    fn put(&self, sender: http1::SendRequest<B>) {
        let since_epoch = self.epoch.load(Ordering::Relaxed);
        lock(&self.idle).push(IdleConn {
            sender,
            since_epoch,
        });
        // Only when at the cap does anyone wait for a returned connection.
        if self.queued.load(Ordering::SeqCst) > 0 {
            self.returned.notify_waiters();
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
                let (expired, still_idle): (Vec<IdleConn<B>>, usize) = {
                    let mut idle = lock(&pool.idle);
                    // Oldest first: stop at the first that is still young.
                    let keep_from = idle
                        .iter()
                        .position(|c| now - c.since_epoch <= idle_ticks)
                        .unwrap_or(idle.len());
                    (idle.drain(..keep_from).collect(), idle.len())
                };
                // Sampled here rather than on every checkout and return.
                metrics::gauge!(metric_names::UPSTREAM_CONNECTIONS_IDLE.name, "route" => Arc::clone(&pool.route))
                    .set(still_idle as f64);
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

/// Runs a connection's driver (its reads, writes and keep-alive) until the
/// connection closes, then gives its place under the cap back.
fn drive<C>(conn: C, protocol: &'static str, permit: OwnedSemaphorePermit)
where
    C: Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, protocol, "upstream connection ended");
        }
        drop(permit);
    });
}

/// Counts a request as waiting for a connection while it lives.
struct Queued<'a>(&'a AtomicUsize);

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A poisoned lock only means a panic elsewhere while it was held; the
/// vectors it guards are always in a usable state.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
