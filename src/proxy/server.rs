//! The accept loop (at most `max_connections` client connections at once),
//! one task per client connection with its timers, and the graceful drain.
//!
//! At the connection cap the proxy stops accepting, as nginx
//! (`worker_connections`) and HAProxy (`maxconn`) do: new clients wait in
//! the kernel's listen backlog and are served as soon as an old connection
//! goes, instead of being accepted and dropped (Envoy's
//! `max_downstream_connections`), which would fail them at once.
//!
//! The cap may be shared by the accept loops of several runtimes, each
//! with its own `SO_REUSEPORT` listener (`SharedLimits`). A loop therefore
//! accepts first and then waits for a place: one holding a place while its
//! own backlog is empty would keep a client queued on another listener
//! waiting. So at the cap each loop holds at most one accepted connection,
//! unread and without timers, until a place comes free.
//!
//! A connection with its place goes to the runtime of the listener that
//! serves the fewest connections (`balance.rs`): the kernel's choice of
//! listener does not look at how many each runtime already has.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    ops::DerefMut,
    pin::{Pin, pin},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
    time::Duration,
};

use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulConnection},
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, mpsc, watch},
    task::JoinSet,
    time::{Instant, Sleep},
};
use tower::BoxError;

use super::{
    Proxy, ServerSettings,
    activity::{ConnActivity, ConnTimers, Step},
    balance::{Assigned, Handoff, Place},
    io::ClientIo,
    metrics::ProxyMetrics,
    service::ConnService,
    stream_watch::StreamExecutor,
    task_waker::TaskWaker,
};
use crate::metric_names;

/// How long to pause accepting after an error such as "too many open files".
pub(crate) const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// What an HTTP/2 client without TLS sends first (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Applies the HTTP/1 settings every connection is served with to hyper's
/// builder or to the auto builder's, whose setters have the same names.
macro_rules! http1_settings {
    ($builder:expr, $settings:expr) => {
        $builder
            .timer(TokioTimer::new())
            // Request heads are timed by the connection's task instead (see
            // `activity.rs`), without a timer armed per request.
            .header_read_timeout(None)
            // A head must fit in the read buffer (hyper answers 431 when
            // not); hyper's own floor for it is 8 KiB.
            .max_buf_size($settings.max_request_header_bytes.max(8192))
            // No read while a request is in flight: a client's FIN is not
            // an abort (a half-closing client gets its answer), and the
            // next read comes once the request's head is dropped, so hyper
            // reuses its read buffer instead of allocating a new 8 KiB one
            // per request.
            .half_close(true)
            .keep_alive(true)
    };
}

/// The connection builders: for HTTP/1, for HTTP/2, and one that reads
/// the first bytes itself to tell them apart.
///
/// The protocol is told from the first bytes looked at without reading
/// them (`peek`) where they suffice, so that hyper's first read gets the
/// whole request head: after the auto builder's own look (it reads up to
/// 24 bytes and hands them back), hyper's next read grows its buffer to
/// 16 KiB, and requests then walk through all of it.
///
/// HTTP/1 connections, nearly all of them, are hyper's own: the auto
/// builder's connection holds an HTTP/2 connection's state in place
/// (about 900 bytes more for every connection, idle ones included) and
/// puts a rewind layer under every read and write.
#[derive(Debug)]
struct Builders {
    http1: http1::Builder,
    http2: auto::Builder<StreamExecutor>,
    either: auto::Builder<StreamExecutor>,
}

impl Builders {
    fn new(settings: &ServerSettings, metrics: &Arc<ProxyMetrics>) -> Self {
        let streams = StreamExecutor::new(settings.timers.send, Arc::clone(metrics));
        let mut either = auto::Builder::new(streams);
        http1_settings!(either.http1(), settings);
        either
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(settings.http2_max_concurrent_streams)
            .max_pending_accept_reset_streams(settings.http2_max_pending_accept_reset_streams)
            .max_local_error_reset_streams(settings.http2_max_local_error_reset_streams)
            .max_header_list_size(
                u32::try_from(settings.max_request_header_bytes).unwrap_or(u32::MAX),
            );
        let mut http1 = http1::Builder::new();
        http1_settings!(http1, settings);
        Self {
            http1,
            http2: either.clone().http2_only(),
            either,
        }
    }
}

/// Which builder the first bytes on `stream` call for, once some have
/// arrived; `None` when they do not tell (none, an error, or the start of
/// the HTTP/2 preface), for the builder that reads them itself.
async fn protocol_of(stream: &TcpStream) -> Option<Protocol> {
    let mut first = [0u8; H2_PREFACE.len()];
    match stream.peek(&mut first).await {
        Ok(n) if n > 0 && !H2_PREFACE.starts_with(&first[..n]) => Some(Protocol::Http1),
        Ok(n) if n == H2_PREFACE.len() => Some(Protocol::Http2),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy)]
enum Protocol {
    Http1,
    Http2,
}

pub(super) async fn serve(
    proxy: Proxy,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let settings = proxy.settings;
    let builder = Arc::new(Builders::new(&settings, &proxy.metrics));
    let permits = Arc::clone(&proxy.connections);
    let mut member = proxy.member;
    // Accepted at the cap, waiting for a place.
    let mut waiting: Option<(TcpStream, SocketAddr)> = None;
    // Warned once each time the cap is reached.
    let mut at_cap = false;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    let start = |connections: &mut JoinSet<()>, stream: TcpStream, remote: SocketAddr, place| {
        let local = match stream.local_addr() {
            Ok(local) => local,
            Err(e) => {
                tracing::debug!(error = %e, "accepted connection already gone");
                return;
            }
        };
        let activity = ConnActivity::new(Arc::clone(&proxy.metrics));
        let service = ConnService {
            routes: Arc::clone(&proxy.routes),
            client_ip: ConnService::client_ip_value(remote.ip()),
            local,
            max_replay_body_bytes: settings.max_replay_body_bytes,
            max_request_header_bytes: settings.max_request_header_bytes,
            replay_budget: Arc::clone(&proxy.replay_budget),
            request_body_timeout: settings.request_body_timeout,
            activity: Arc::clone(&activity),
        };
        connections.spawn(serve_connection(Connection {
            builder: Arc::clone(&builder),
            stream,
            remote,
            service,
            activity,
            timers: settings.timers,
            control_frames_per_second: settings.http2_max_control_frames_per_second,
            metrics: Arc::clone(&proxy.metrics),
            stop: stop_rx.clone(),
            place,
        }));
    };
    tokio::pin!(shutdown);
    loop {
        let next = tokio::select! {
            biased;
            () = &mut shutdown => break,
            // The semaphore is never closed.
            Ok(permit) = Arc::clone(&permits).acquire_owned(), if waiting.is_some() => {
                waiting.take().map_or(Next::Nothing, |accepted| Next::Accepted(accepted, permit))
            }
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    tracing::error!("a connection task panicked");
                }
                Next::Nothing
            }
            // Senders live as long as the balancer, so `None` never comes.
            Some(handoff) = member.inbox.recv() => Next::Handed(handoff),
            accepted = listener.accept(), if waiting.is_none() => match accepted {
                Ok(accepted) => match Arc::clone(&permits).try_acquire_owned() {
                    Ok(permit) => {
                        at_cap = false;
                        Next::Accepted(accepted, permit)
                    }
                    Err(_) => {
                        if !at_cap {
                            tracing::warn!(
                                max_connections = settings.max_connections,
                                "client connection limit reached; new connections wait until one closes"
                            );
                        }
                        at_cap = true;
                        waiting = Some(accepted);
                        Next::Nothing
                    }
                },
                Err(e) if is_connection_error(&e) => {
                    tracing::debug!(error = %e, "connection failed before it was accepted");
                    Next::Nothing
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept connections; pausing");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    Next::Nothing
                }
            },
        };
        match next {
            Next::Nothing => {}
            Next::Accepted((stream, remote), permit) => match member.assign(permit) {
                Assigned::Keep(place) => start(&mut connections, stream, remote, place),
                Assigned::Send(inbox, place) => {
                    if let Some((stream, remote, place)) = hand_over(inbox, stream, remote, place) {
                        start(&mut connections, stream, remote, member.keep(place));
                    }
                }
            },
            Next::Handed(handoff) => {
                if let Some((stream, remote, place)) = take_over(handoff) {
                    start(&mut connections, stream, remote, place);
                }
            }
        }
    }

    // Connections handed over before the other runtimes stopped are served
    // (and drained) here; from now on the others keep what they accept.
    member.inbox.close();
    while let Ok(handoff) = member.inbox.try_recv() {
        if let Some((stream, remote, place)) = take_over(handoff) {
            start(&mut connections, stream, remote, place);
        }
    }
    // New connections are refused from here on.
    drop(listener);
    let _ = stop_tx.send(true);
    tracing::info!(
        connections = connections.len(),
        grace_ms = settings.shutdown_grace.as_millis() as u64,
        "proxy shutting down; draining connections"
    );
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(settings.shutdown_grace, drain)
        .await
        .is_err()
    {
        tracing::warn!(
            connections = connections.len(),
            "shutdown grace period over; closing the remaining connections"
        );
        connections.shutdown().await;
    }
    tracing::info!("proxy stopped");
    Ok(())
}

/// What the accept loop's wait ended with.
enum Next {
    Nothing,
    /// Accepted on this runtime's listener, with a place under the cap.
    Accepted((TcpStream, SocketAddr), OwnedSemaphorePermit),
    /// Accepted by another runtime of the listener for this one.
    Handed(Handoff),
}

/// Sends a connection to the runtime `inbox` belongs to, off this
/// runtime's event loop. Gives it back when that runtime has stopped.
fn hand_over(
    inbox: mpsc::UnboundedSender<Handoff>,
    stream: TcpStream,
    remote: SocketAddr,
    place: Place,
) -> Option<(TcpStream, SocketAddr, Place)> {
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(error = %e, "accepted connection already gone");
            return None;
        }
    };
    let back = inbox
        .send(Handoff {
            stream,
            remote,
            place,
        })
        .err()?
        .0;
    take_over(back)
}

/// A connection from another runtime, put on this runtime's event loop.
fn take_over(handoff: Handoff) -> Option<(TcpStream, SocketAddr, Place)> {
    match TcpStream::from_std(handoff.stream) {
        Ok(stream) => Some((stream, handoff.remote, handoff.place)),
        Err(e) => {
            tracing::debug!(error = %e, "cannot serve a connection another core accepted");
            None
        }
    }
}

/// One client connection and what serving it needs.
struct Connection {
    builder: Arc<Builders>,
    stream: TcpStream,
    remote: SocketAddr,
    service: ConnService,
    activity: Arc<ConnActivity>,
    timers: ConnTimers,
    control_frames_per_second: u32,
    metrics: Arc<ProxyMetrics>,
    stop: watch::Receiver<bool>,
    /// Its place under `max_connections` and its count on this runtime,
    /// given back when it ends.
    place: Place,
}

/// Serves one client connection until it ends, asking it to close on
/// shutdown or once idle, and closing it when a timer of
/// [`ConnActivity::next_step`] runs out.
///
/// The task's future holds only the fields it uses (an `async fn` would
/// also keep the whole `Connection` it was given, 320 bytes, for the
/// connection's life: every idle connection pays for what its task holds).
fn serve_connection(conn: Connection) -> impl Future<Output = ()> + Send + 'static {
    let Connection {
        builder,
        stream,
        remote,
        service,
        activity,
        timers,
        control_frames_per_second,
        metrics,
        mut stop,
        place,
    } = conn;
    async move {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let open = OpenConnection::count(&metrics);
        let watchdog = tokio::time::sleep(timers.header_read);
        tokio::pin!(watchdog);
        // Shutdown or the header timer before the first bytes: left to the
        // builder that reads them, and to the loop below, as any connection.
        let protocol = tokio::select! {
            biased;
            _ = stop.wait_for(|stop| *stop) => None,
            () = watchdog.as_mut() => None,
            protocol = protocol_of(&stream) => protocol,
        };
        let io = TokioIo::new(ClientIo::new(
            stream,
            Arc::clone(&activity),
            control_frames_per_second,
        ));
        // From here on the timer follows `next_step`, whose first look sets
        // it to the earliest of all the connection's timers (the send and
        // idle timers may be shorter than the header timer it ran on so far).
        watchdog.as_mut().reset(Instant::now());
        let mut serving = Serving {
            remote,
            activity: &activity,
            timers: &timers,
            stop: &mut stop,
            watchdog: watchdog.as_mut(),
        };
        // HTTP/2 and undecided connections are boxed: in place, their larger
        // state would make every HTTP/1 connection's task as large.
        match protocol {
            Some(Protocol::Http1) => {
                activity.speaks_http1();
                let connection = builder.http1.serve_connection(io, service);
                tokio::pin!(connection);
                until_closed(&mut serving, connection).await;
            }
            Some(Protocol::Http2) => {
                let connection = Box::pin(builder.http2.serve_connection(io, service));
                until_closed(&mut serving, connection).await;
            }
            None => {
                let connection = Box::pin(builder.either.serve_connection(io, service));
                until_closed(&mut serving, connection).await;
            }
        }
        drop(open);
        // Its place under `max_connections` is given back last.
        drop(place);
    }
}

/// What a client connection's task keeps beside hyper's connection.
struct Serving<'a> {
    remote: SocketAddr,
    activity: &'a ConnActivity,
    timers: &'a ConnTimers,
    stop: &'a mut watch::Receiver<bool>,
    watchdog: Pin<&'a mut Sleep>,
}

/// Drives `connection` until it ends, asking it to close on shutdown or
/// once a timer calls for it, and dropping it when a timer runs out.
///
/// The connection is polled whenever the task is; the shutdown signal and
/// the connection's timer only when one of them woke it (see [`SideWake`]).
/// Most polls of the task come from the sockets, about two a request, and
/// looking at the other two each time cost about 240 instructions a poll.
async fn until_closed<C>(serving: &mut Serving<'_>, mut connection: Pin<impl DerefMut<Target = C>>)
where
    C: GracefulConnection,
    C::Error: Into<BoxError>,
{
    let Serving {
        remote,
        activity,
        timers,
        stop,
        watchdog,
    } = serving;
    let mut closing_since: Option<Instant> = None;
    let mut stopping = pin!(stop.wait_for(|stop| *stop));
    let side = Arc::new(SideWake::default());
    let side_waker = Waker::from(Arc::clone(&side));
    std::future::poll_fn(|cx| {
        loop {
            if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                if let Err(e) = result {
                    let e: BoxError = e.into();
                    tracing::debug!(remote = %remote, error = &*e as &dyn std::error::Error, "client connection ended with an error");
                }
                return Poll::Ready(());
            }
            side.task.set(cx.waker());
            if !side.woken.swap(false, Ordering::AcqRel) {
                return Poll::Pending;
            }
            let mut side_cx = Context::from_waker(&side_waker);
            // Whatever happens below is looked at again at once: the
            // connection asked to close, and a timer set anew, registered.
            if closing_since.is_none() && stopping.as_mut().poll(&mut side_cx).is_ready() {
                closing_since = Some(Instant::now());
                connection.as_mut().graceful_shutdown();
                watchdog.as_mut().reset(Instant::now());
                side.woken.store(true, Ordering::Relaxed);
                continue;
            }
            if watchdog.as_mut().poll(&mut side_cx).is_ready() {
                let now = Instant::now();
                match activity.next_step(now, timers, closing_since) {
                    Step::SleepUntil(at) => watchdog.as_mut().reset(at),
                    Step::Drain(reason) => {
                        tracing::debug!(remote = %remote, reason = reason.as_str(), "asking the client connection to close");
                        closed_counter(reason.as_str());
                        closing_since = Some(now);
                        connection.as_mut().graceful_shutdown();
                        watchdog.as_mut().reset(now);
                    }
                    Step::Close(reason) => {
                        tracing::debug!(remote = %remote, reason = reason.as_str(), "closing client connection");
                        closed_counter(reason.as_str());
                        return Poll::Ready(());
                    }
                }
                side.woken.store(true, Ordering::Relaxed);
                continue;
            }
            return Poll::Pending;
        }
    })
    .await;
}

/// The waker a client connection's shutdown signal and timer are polled
/// with: it notes that one of them woke the task, and wakes the task.
struct SideWake {
    /// Set when the shutdown signal or the timer wakes the task, and at
    /// first, so that the first poll registers them.
    woken: AtomicBool,
    task: TaskWaker,
}

impl Default for SideWake {
    fn default() -> Self {
        Self {
            woken: AtomicBool::new(true),
            task: TaskWaker::default(),
        }
    }
}

impl Wake for SideWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

fn closed_counter(reason: &'static str) {
    metrics::counter!(metric_names::CLIENT_CONNECTIONS_CLOSED_TOTAL.name, "reason" => reason)
        .increment(1);
}

/// Counts a client connection as open while it lives.
struct OpenConnection<'a>(&'a ProxyMetrics);

impl<'a> OpenConnection<'a> {
    fn count(metrics: &'a ProxyMetrics) -> Self {
        metrics.connections().increment(1.0);
        Self(metrics)
    }
}

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.connections().decrement(1.0);
    }
}

/// Errors about one connection, not about the listener.
pub(crate) fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    /// What `protocol_of` makes of `first` sent on a real socket, and that
    /// it leaves the bytes to be read.
    async fn sniffed(first: &[u8], close: bool) -> Option<Protocol> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        client.write_all(first).await.unwrap();
        if close {
            client.shutdown().await.unwrap();
        }
        let protocol = protocol_of(&server).await;
        let mut unread = vec![0u8; first.len()];
        if !first.is_empty() {
            server.peek(&mut unread).await.unwrap();
            assert_eq!(unread, first, "the bytes stay for hyper to read");
        }
        protocol
    }

    #[tokio::test]
    async fn the_first_bytes_pick_the_protocol_without_being_read() {
        assert!(matches!(
            sniffed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false).await,
            Some(Protocol::Http1)
        ));
        assert!(sniffed(b"P", true).await.is_none());
        assert!(matches!(
            sniffed(b"POST / HTTP/1.1\r\n", false).await,
            Some(Protocol::Http1)
        ));
        assert!(matches!(
            sniffed(H2_PREFACE, false).await,
            Some(Protocol::Http2)
        ));
        // Part of the preface so far: the builder that reads waits for more.
        assert!(sniffed(b"PRI * HTTP/2", false).await.is_none());
        // Closed without a byte: hyper sees the end itself.
        assert!(sniffed(b"", true).await.is_none());
    }
}
