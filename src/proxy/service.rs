//! [`ConnService`]: what hyper calls for each request on one client
//! connection. Picks the route, checks the target, has the route's
//! forwarder rewrite the request for the upstream (hop-by-hop fields, path,
//! forwarding fields) *before* the token is set, keeps the metrics and the
//! request span, decides whether the body is buffered (replayable) or
//! streamed, and hands the request to the route's
//! `BearerTokenService<Forwarder>`; on a per-caller route it has the
//! caller's token exchanged and calls the forwarder itself, replaying a
//! buffered request once after a `401` when `CallerTokens::reexchange`
//! gives a new token.
//!
//! The `request` span is at `DEBUG`: at the default `info` level it is
//! disabled and costs a level check, not a span allocation and the
//! formatting of its fields on every request. The one event above `DEBUG`
//! in it (an upstream failure) names the method and path itself.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, Waker, ready},
    time::Duration,
};

use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header, request};
use http_body::Body as _;
use http_body_util::{BodyExt as _, combinators::Collect};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::{Instant, Sleep},
};
use tracing::{Span, field::Empty};

use super::{
    activity::{ConnActivity, RequestGuard},
    body::ProxyBody,
    error::{
        bad_body_response, body_timeout_response, caller_refused_response,
        caller_token_missing_response, head_too_large_response, no_route_response,
        path_refusal_response, refusal_response, upstream_error_response,
    },
    forward::{ClientFault, ForwardError, ForwardFuture, Forwarder},
    metrics::{ClientError, RouteMetrics},
    route::{PerCaller, RouteTable, Unrouted},
    stream_watch,
    target::Refusal,
    upload::{ClientBody, UpstreamBody},
};
use crate::{
    cache::{Reexchange, TokenUnavailable},
    layer::{BearerTokenError, BearerTokenService, ReplayBody, ReplayCopy, unavailable_response},
    secret::Secret,
    token::Token,
};

/// A caller's token being exchanged (or looked up); the caller's inbound
/// token comes back with it.
type CallerTokenFuture =
    Pin<Box<dyn Future<Output = (Result<Arc<Token>, TokenUnavailable>, Secret)> + Send>>;
/// A caller's token being exchanged again after a `401`.
type ReexchangeFuture = Pin<Box<dyn Future<Output = Reexchange> + Send>>;

/// Token layer over forwarder.
pub(super) type Stack = BearerTokenService<Forwarder>;
/// What the token layer's call returns.
type StackFuture = <Stack as tower::Service<Request<UpstreamBody>>>::Future;

/// Per-connection request handler.
#[derive(Debug, Clone)]
pub(super) struct ConnService {
    pub(super) routes: Arc<RouteTable>,
    /// The client's address, for `X-Forwarded-For`.
    pub(super) client_ip: Option<HeaderValue>,
    pub(super) local: SocketAddr,
    pub(super) max_replay_body_bytes: u64,
    pub(super) max_request_header_bytes: usize,
    /// One permit per KiB of the bodies held for a replay, all connections.
    pub(super) replay_budget: Arc<Semaphore>,
    pub(super) request_body_timeout: Duration,
    pub(super) activity: Arc<ConnActivity>,
}

impl ConnService {
    /// Small and of known size, and room for it in the replay budget: held
    /// in memory so that a `401` can be answered by a replay, its room
    /// taken until the permit is dropped. Without room it is streamed like
    /// a large body: the budget bounds the memory all clients can make the
    /// proxy hold (many h2 streams each sending all but the last byte).
    fn hold_for_replay(&self, body: &Incoming) -> Option<OwnedSemaphorePermit> {
        let size = body
            .size_hint()
            .exact()
            .filter(|n| *n <= self.max_replay_body_bytes)?;
        let kib = u32::try_from(size.div_ceil(1024)).ok()?;
        let permit = Arc::clone(&self.replay_budget)
            .try_acquire_many_owned(kib)
            .ok();
        if permit.is_none() {
            tracing::debug!(size, "replay buffer full; the body is streamed");
        }
        permit
    }

    /// Whether an HTTP/1 head is larger than the limit, counted with the
    /// least bytes its parts could have taken on the wire (one byte for
    /// each separator and line end), so a head within the limit is never
    /// taken for one above it. h2 enforces its own header list size.
    fn head_too_large<B>(&self, request: &Request<B>) -> bool {
        if request.version() == Version::HTTP_2 {
            return false;
        }
        let uri = request.uri();
        let mut size = request.method().as_str().len()
            + uri.authority().map_or(0, |a| a.as_str().len())
            + uri.path_and_query().map_or(1, |p| p.as_str().len())
            + "  HTTP/1.1\n\n".len();
        // Short-circuits once over, however many fields there are.
        request.headers().iter().any(|(name, value)| {
            size += name.as_str().len() + value.len() + 2;
            size > self.max_request_header_bytes
        }) || size > self.max_request_header_bytes
    }

    /// `ip` as an `X-Forwarded-For` element.
    pub(super) fn client_ip_value(ip: std::net::IpAddr) -> Option<HeaderValue> {
        HeaderValue::from_maybe_shared(bytes::Bytes::from(ip.to_canonical().to_string())).ok()
    }
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = ProxyFuture;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let guard = self.activity.start(request.version());
        let span = tracing::debug_span!(
            "request",
            method = %request.method(),
            path = request.uri().path(),
            status = Empty,
            duration_ms = Empty,
        );
        let start = Instant::now();
        let table = &*self.routes;
        let mut future = ProxyFuture {
            state: ProxyState::Done,
            guard: Some(guard),
            replay_room: None,
            span,
            start,
            metrics: Arc::clone(&table.unrouted),
            // For the warning should the upstream fail; both are cheap
            // clones (an enum, shared bytes).
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
        };
        if self.head_too_large(&request) {
            future.state = ProxyState::ready(head_too_large_response());
            return future;
        }
        // Not a tunnel, and no echo of the token, whichever route would match.
        if let Some(refusal) = Refusal::of_method(request.method()) {
            return future.refused(ClientError::TargetRefused, refusal_response(refusal));
        }
        let route = match table.select(request.uri(), request.headers()) {
            Ok(route) => route,
            Err(Unrouted::Path(refusal)) => {
                future
                    .span
                    .in_scope(|| tracing::debug!(?refusal, "request path refused"));
                return future.refused(ClientError::PathRefused, path_refusal_response(refusal));
            }
            Err(Unrouted::NoRoute) => {
                future
                    .span
                    .in_scope(|| tracing::debug!("no route takes the request"));
                return future.refused(ClientError::NoRoute, no_route_response());
            }
        };
        future.metrics = Arc::clone(&route.metrics);
        if let Err(refusal) = route.check.check(
            request.method(),
            request.version(),
            request.uri(),
            self.local,
        ) {
            future
                .span
                .in_scope(|| tracing::debug!(?refusal, "request refused"));
            return future.refused(ClientError::TargetRefused, refusal_response(refusal));
        }

        let (mut parts, body) = request.into_parts();
        // Before the token layer: see `Forwarder::prepare`.
        if let Err(refusal) = route
            .stack
            .get_ref()
            .prepare(&mut parts, self.client_ip.as_ref())
        {
            future
                .span
                .in_scope(|| tracing::debug!(?refusal, "request path refused"));
            return future.refused(ClientError::PathRefused, path_refusal_response(refusal));
        }
        if let Some(per_caller) = &route.per_caller {
            // The caller's token never goes upstream: removed here, whatever follows.
            let Some(inbound) = per_caller.take_inbound(&mut parts.headers) else {
                future
                    .span
                    .in_scope(|| tracing::debug!("no caller token on a per-caller route"));
                future.state = ProxyState::ready(caller_token_missing_response());
                return future;
            };
            let caller = Box::new(CallerCall {
                per_caller: Arc::clone(per_caller),
                forwarder: route.stack.get_ref().clone(),
                inbound,
                request: None,
                token: None,
                copy: None,
            });
            // Bodies as on the other routes: small ones held for a replay.
            future.state = if body.is_end_stream() {
                ProxyState::exchange(parts, ReplayBody::empty(), caller)
            } else if let Some(permit) = self.hold_for_replay(&body) {
                future.replay_room = Some(permit);
                ProxyState::Collecting {
                    read: BodyRead::start(
                        body,
                        self.request_body_timeout,
                        parts,
                        Next::Caller(caller),
                    ),
                }
            } else {
                let body = Box::new(ClientBody::new(body, self.request_body_timeout));
                ProxyState::exchange(parts, ReplayBody::streaming(body), caller)
            };
            return future;
        }
        future.state = if body.is_end_stream() {
            ProxyState::call(route.stack.clone(), parts, ReplayBody::empty())
        } else if let Some(permit) = self.hold_for_replay(&body) {
            future.replay_room = Some(permit);
            ProxyState::Collecting {
                read: BodyRead::start(
                    body,
                    self.request_body_timeout,
                    parts,
                    Next::Stack(route.stack.clone()),
                ),
            }
        } else {
            let body = Box::new(ClientBody::new(body, self.request_body_timeout));
            ProxyState::call(route.stack.clone(), parts, ReplayBody::streaming(body))
        };
        future
    }
}

pin_project! {
    /// Response future of [`ConnService`].
    pub(super) struct ProxyFuture {
        #[pin]
        state: ProxyState,
        guard: Option<RequestGuard>,
        // Its body's room in the replay budget, while it is held.
        replay_room: Option<OwnedSemaphorePermit>,
        span: Span,
        start: Instant,
        // The route's (or, until one is chosen, the unrouted ones).
        metrics: Arc<RouteMetrics>,
        method: Method,
        uri: Uri,
        version: Version,
    }
}

pin_project! {
    // The futures of the states that forward or read a body are boxed, and
    // so is what the states off the plain path hold (a request head, a
    // response): hyper keeps a place the size of `ProxyFuture` for each
    // connection, idle ones included, and the future is moved into it on
    // every request (in place, the forwarding states would make it about
    // 1.2 KB, and a request head or a response about 250 bytes more).
    #[project = ProxyStateProj]
    enum ProxyState {
        // Answered without forwarding.
        Ready { response: Option<Box<Response<ProxyBody>>> },
        // Reading a small body into memory, all of it within
        // `request_body_timeout`.
        Collecting { read: Pin<Box<BodyRead>> },
        // Token layer and forwarder at work.
        Calling {
            call: Pin<Box<StackFuture>>,
        },
        // A per-caller route: the caller's token being exchanged, the
        // request held in `caller`.
        Exchanging {
            exchange: CallerTokenFuture,
            caller: Option<Box<CallerCall>>,
        },
        // A per-caller route: the forwarder at work, the caller's token set;
        // `caller` is there until a `401` has been dealt with once.
        Forwarding {
            call: Pin<Box<ForwardFuture>>,
            caller: Option<Box<CallerCall>>,
        },
        // A per-caller route after a `401`: the caller's token exchanged
        // again (or not, within its budget); the `401` kept meanwhile.
        Reexchanging {
            reexchange: ReexchangeFuture,
            unauthorized: Option<Box<Response<ProxyBody>>>,
            caller: Option<Box<CallerCall>>,
        },
        Done,
    }
}

pin_project! {
    /// A small body being read into memory, its deadline, and the rest of
    /// its request.
    struct BodyRead {
        #[pin]
        collect: Collect<Incoming>,
        #[pin]
        timer: Sleep,
        request: Option<(request::Parts, Next)>,
    }
}

impl BodyRead {
    fn start(
        body: Incoming,
        within: Duration,
        parts: request::Parts,
        next: Next,
    ) -> Pin<Box<Self>> {
        Box::pin(Self {
            collect: body.collect(),
            timer: tokio::time::sleep(within),
            request: Some((parts, next)),
        })
    }
}

impl ProxyFuture {
    /// Answers without forwarding, counted as the client's error.
    fn refused(mut self, kind: ClientError, response: Response<ProxyBody>) -> Self {
        self.metrics.listener.client_errors(kind).increment(1);
        self.state = ProxyState::ready(response);
        self
    }
}

impl ProxyState {
    fn ready(response: Response<ProxyBody>) -> Self {
        Self::Ready {
            response: Some(Box::new(response)),
        }
    }

    fn call(mut stack: Stack, parts: request::Parts, body: UpstreamBody) -> Self {
        Self::Calling {
            call: call_now(&mut stack, Request::from_parts(parts, body)),
        }
    }

    fn exchange(parts: request::Parts, body: UpstreamBody, mut caller: Box<CallerCall>) -> Self {
        // Lent to the lookup, not copied; it comes back with the token.
        let inbound = std::mem::take(&mut caller.inbound);
        caller.request = Some((parts, body));
        Self::Exchanging {
            exchange: Box::pin(caller.per_caller.tokens.get_keeping(inbound)),
            caller: Some(caller),
        }
    }
}

/// `service`'s response future for `request`, boxed. The forwarder is
/// always ready (its pool queues requests itself) and so is the token layer
/// over it, so the call is made at once: tower's `Oneshot` would move the
/// request into itself and then move the future it gets over the request,
/// a copy of each on every request. `poll_ready` is still asked first, as
/// tower's contract wants.
fn call_now<S>(service: &mut S, request: Request<UpstreamBody>) -> Pin<Box<S::Future>>
where
    S: tower::Service<Request<UpstreamBody>>,
{
    let ready = service.poll_ready(&mut Context::from_waker(Waker::noop()));
    debug_assert!(
        matches!(ready, Poll::Ready(Ok(()))),
        "the token layer and the forwarder are always ready"
    );
    Box::pin(service.call(request))
}

/// Where a request goes once its body is in memory.
enum Next {
    Stack(Stack),
    Caller(Box<CallerCall>),
}

/// A request of a per-caller route: what a replay after a `401` needs.
struct CallerCall {
    per_caller: Arc<PerCaller>,
    forwarder: Forwarder,
    inbound: Secret,
    /// The request, while the caller's token is exchanged.
    request: Option<(request::Parts, UpstreamBody)>,
    /// The token the request went upstream with.
    token: Option<Arc<Token>>,
    /// A copy of the request, when its body can be sent again.
    copy: Option<ReplayCopy<UpstreamBody>>,
}

impl CallerCall {
    /// Sets the caller's `token` on `request`, keeps a copy of it if its
    /// body is replayable, and sends it.
    fn forward(
        mut self: Box<Self>,
        mut request: Request<UpstreamBody>,
        token: Arc<Token>,
    ) -> ProxyState {
        self.per_caller.apply(request.headers_mut(), &token);
        self.copy = ReplayCopy::of(&request);
        self.token = Some(token);
        ProxyState::Forwarding {
            call: call_now(&mut self.forwarder, request),
            caller: Some(self),
        }
    }
}

impl Future for ProxyFuture {
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        let mut response = loop {
            match this.state.as_mut().project() {
                ProxyStateProj::Ready { response } => {
                    break *response
                        .take()
                        .expect("ProxyFuture polled after completion");
                }
                ProxyStateProj::Collecting { read } => match read
                    .as_mut()
                    .project()
                    .collect
                    .poll(cx)
                {
                    Poll::Ready(Ok(collected)) => {
                        let (parts, next) = read
                            .as_mut()
                            .project()
                            .request
                            .take()
                            .expect("request held while its body is read");
                        let body = ReplayBody::buffered(collected.to_bytes());
                        this.state.set(match next {
                            Next::Stack(stack) => ProxyState::call(stack, parts, body),
                            Next::Caller(caller) => ProxyState::exchange(parts, body, caller),
                        });
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::debug!(error = %e, "client request body broke off");
                        break client_fault(this.metrics, *this.version, ClientFault::BadBody);
                    }
                    Poll::Pending => {
                        ready!(read.as_mut().project().timer.poll(cx));
                        tracing::debug!("client request body did not arrive in time");
                        break client_fault(this.metrics, *this.version, ClientFault::BodyTimeout);
                    }
                },
                ProxyStateProj::Calling { call } => {
                    break match ready!(call.as_mut().poll(cx)) {
                        Ok(response) => response,
                        Err(BearerTokenError::Token(e)) => unavailable_response(&e),
                        Err(BearerTokenError::Inner(e)) => {
                            forward_failure(this.metrics, this.method, this.uri, *this.version, e)
                        }
                    };
                }
                ProxyStateProj::Exchanging { exchange, caller } => {
                    let (result, inbound) = ready!(exchange.as_mut().poll(cx));
                    let mut caller = caller.take().expect("caller held while exchanging");
                    let (parts, body) = caller
                        .request
                        .take()
                        .expect("request held while its caller's token is exchanged");
                    caller.inbound = inbound;
                    match result {
                        Ok(token) => {
                            let request = Request::from_parts(parts, body);
                            this.state.set(caller.forward(request, token));
                        }
                        Err(e) => {
                            tracing::debug!(kind = e.kind(), "caller's token not exchanged");
                            break caller_refused_response(&e);
                        }
                    }
                }
                ProxyStateProj::Forwarding { call, caller } => {
                    let response = match ready!(call.as_mut().poll(cx)) {
                        Ok(response) => response,
                        Err(e) => {
                            break forward_failure(
                                this.metrics,
                                this.method,
                                this.uri,
                                *this.version,
                                e,
                            );
                        }
                    };
                    if response.status() != StatusCode::UNAUTHORIZED {
                        break response;
                    }
                    let Some(mut caller) = caller.take() else {
                        break response;
                    };
                    let token = caller.token.take().expect("token set when forwarded");
                    let reexchange = caller
                        .per_caller
                        .tokens
                        .reexchange(caller.inbound.clone(), token);
                    if caller.copy.is_none() {
                        // Not replayable: the 401 goes back; the caller's
                        // next request finds a new token.
                        tracing::debug!(
                            "upstream answered 401 to a streamed request; exchanging the caller's token again"
                        );
                        tokio::spawn(reexchange);
                        break response;
                    }
                    this.state.set(ProxyState::Reexchanging {
                        reexchange: Box::pin(reexchange),
                        unauthorized: Some(Box::new(response)),
                        caller: Some(caller),
                    });
                }
                ProxyStateProj::Reexchanging {
                    reexchange,
                    unauthorized,
                    caller,
                } => {
                    let outcome = ready!(reexchange.as_mut().poll(cx));
                    let unauthorized = *unauthorized.take().expect("401 held while exchanging");
                    let mut caller = caller.take().expect("request held while exchanging");
                    match outcome {
                        Reexchange::Replay(token) => {
                            let copy = caller.copy.take().expect("copy held for the replay");
                            // Fails only for parts the `http` crate rules out.
                            let Some(mut copy) = copy.into_request() else {
                                break unauthorized;
                            };
                            tracing::debug!(
                                "upstream answered 401; replaying with the caller's new token"
                            );
                            // The 401's body is of no use; let its connection go.
                            drop(unauthorized);
                            caller.per_caller.apply(copy.headers_mut(), &token);
                            this.state.set(ProxyState::Forwarding {
                                call: call_now(&mut caller.forwarder, copy),
                                caller: None,
                            });
                        }
                        Reexchange::Limited => break unauthorized,
                        Reexchange::Unavailable(e) => {
                            tracing::debug!(
                                kind = e.kind(),
                                "caller's token not exchanged after a 401"
                            );
                            break caller_refused_response(&e);
                        }
                    }
                }
                ProxyStateProj::Done => panic!("ProxyFuture polled after completion"),
            }
        };
        this.state.set(ProxyState::Done);

        let status = response.status();
        let elapsed = this.start.elapsed();
        if !this.span.is_disabled() {
            this.span.record("status", status.as_u16());
            this.span
                .record("duration_ms", elapsed.as_secs_f64() * 1000.0);
            tracing::debug!("request completed");
        }
        this.metrics.requests(status).increment(1);
        this.metrics.duration().record(elapsed.as_secs_f64());
        if let Some(guard) = this.guard.take() {
            response.body_mut().set_guard(guard);
        }
        stream_watch::answered();
        Poll::Ready(Ok(response))
    }
}

/// The answer when the forwarder failed: the client's fault (its body), or
/// the upstream's, counted and logged.
fn forward_failure(
    metrics: &RouteMetrics,
    method: &Method,
    uri: &Uri,
    version: Version,
    e: ForwardError,
) -> Response<ProxyBody> {
    if let ForwardError::Client(fault, e) = e {
        tracing::debug!(
            error = &*e as &dyn std::error::Error,
            "client request body broke off"
        );
        return client_fault(metrics, version, fault);
    }
    if let Some(counter) = e.kind().and_then(|k| metrics.upstream_errors(k)) {
        counter.increment(1);
    }
    tracing::warn!(
        method = %method,
        path = uri.path(),
        kind = e.kind(),
        error = &e as &dyn std::error::Error,
        "upstream request failed"
    );
    upstream_error_response(&e)
}

/// The answer to a request whose body the client broke or did not send:
/// `400` or `408`, counted as the client's error; an HTTP/1 connection is
/// closed after it, since what follows on it cannot be framed.
fn client_fault(
    metrics: &RouteMetrics,
    version: Version,
    fault: ClientFault,
) -> Response<ProxyBody> {
    let (mut response, kind) = match fault {
        ClientFault::BadBody => (bad_body_response(), ClientError::BadBody),
        ClientFault::BodyTimeout => (body_timeout_response(), ClientError::BodyTimeout),
    };
    metrics.listener.client_errors(kind).increment(1);
    if version != Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hyper keeps a place the size of the response future for every
    /// HTTP/1 connection, idle ones included (1,000 idle connections: 1 MB
    /// at 1 KB each), and moves the future into it on every request, so the
    /// states that forward or read a body stay boxed, and so do the request
    /// heads and responses that the states off the plain path hold (248
    /// bytes; 488 with those in place).
    #[test]
    fn the_response_future_stays_small() {
        let size = std::mem::size_of::<ProxyFuture>();
        assert!(size <= 256, "ProxyFuture is {size} bytes");
    }

    /// The token layer's and forwarder's future is boxed anew for every
    /// request, and the whole of it is written into memory that at high
    /// concurrency is no longer in cache; what only a rare path needs (the
    /// keep-alive race's copy of the request) is boxed on its own.
    #[test]
    fn the_forwarding_future_stays_small() {
        let size = std::mem::size_of::<StackFuture>();
        assert!(size <= 720, "the forwarding future is {size} bytes");
    }
}
