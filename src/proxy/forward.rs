//! [`Forwarder`]: the innermost service, one per upstream. Rewrites a
//! request for the upstream ([`Forwarder::prepare`], called before the token
//! layer: URI, `Host`, hop-by-hop fields, `Via`/`X-Forwarded-*`, version),
//! sends it on a pooled connection, and streams the response back.
//!
//! The upstream's response timer runs while the upstream owes the next
//! step: from the call for a buffered or empty body, and for a streamed body
//! from the last part the upstream took (or the body's end). While the
//! proxy waits on the client for more of the body, the body's own timer
//! applies instead (`upload.rs`).

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use http::{HeaderValue, Method, Request, Response, Uri, Version, header, request};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower::Service;

use super::{
    body::ProxyBody,
    headers::{
        PROTO_HTTP, X_FORWARDED_HOST, X_FORWARDED_PROTO, append_forwarded_for, join_cookies,
        strip_request_hop_by_hop, strip_response_hop_by_hop, via_value,
    },
    path::{EscapedSlashes, PathRefusal, UpstreamPath},
    pool::{Lease, PoolError, PoolGroup, PoolSettings, SendFuture, UpstreamPool},
    upload::{Upload, UploadStatus, UpstreamBody, upload_of},
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request got no response from the upstream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    /// No connection to the upstream (refused, unreachable, TLS failure,
    /// connect timeout).
    #[error("cannot connect to the upstream")]
    Connect(#[source] BoxError),
    /// No response headers within `upstream_response_timeout`.
    #[error("the upstream sent no response within {0:?}")]
    Timeout(Duration),
    /// Every upstream connection stayed busy for `upstream_queue_timeout`.
    #[error("no upstream connection came free within {0:?}")]
    Saturated(Duration),
    /// The exchange failed after connecting.
    #[error("the upstream request failed")]
    Other(#[source] BoxError),
    /// The client's request body broke off or stalled: its fault, not the
    /// upstream's.
    #[error("the client's request body did not arrive")]
    Client(ClientFault, #[source] BoxError),
}

/// How a client's request body failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientFault {
    /// Nothing arrived for `request_body_timeout`.
    BodyTimeout,
    /// Bad framing, or cut off before its end.
    BadBody,
}

impl ForwardError {
    /// The `kind` label of `sso_token_proxy_upstream_errors_total`; `None`
    /// for a client's fault.
    pub(crate) fn kind(&self) -> Option<&'static str> {
        match self {
            Self::Connect(_) => Some("connect"),
            Self::Timeout(_) => Some("timeout"),
            Self::Saturated(_) => Some("queue_timeout"),
            Self::Other(_) => Some("other"),
            Self::Client(..) => None,
        }
    }
}

/// The upstream and how requests are rewritten for it; shared by all
/// connections.
struct Upstream {
    pool: UpstreamPool<UpstreamBody>,
    /// The upstream's base path; request targets are joined under it.
    path: UpstreamPath,
    host: HeaderValue,
    preserve_host: bool,
    forwarded_headers: bool,
    response_timeout: Duration,
}

/// What [`Forwarder::new`] needs to know.
pub(crate) struct ForwarderSettings<'a> {
    /// The route's name (the `route` label of the pool's metrics).
    pub(crate) route: &'a str,
    pub(crate) upstream: &'a Uri,
    pub(crate) connector: HttpsConnector<HttpConnector>,
    pub(crate) pool: PoolSettings,
    /// The pools that keep to the route's connection cap together.
    pub(crate) pool_group: Arc<PoolGroup<UpstreamBody>>,
    pub(crate) preserve_host: bool,
    pub(crate) forwarded_headers: bool,
    pub(crate) response_timeout: Duration,
    pub(crate) escaped_slashes: EscapedSlashes,
    /// A path prefix to remove before the join with the base path.
    pub(crate) strip_prefix: Option<&'a str>,
}

/// Sends requests to one upstream. Cheap to clone: clones share the pool.
#[derive(Clone)]
pub(crate) struct Forwarder {
    upstream: Arc<Upstream>,
}

impl fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forwarder")
            .field("upstream", &self.upstream.pool)
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// `None` when the upstream URI has no scheme or authority.
    pub(crate) fn new(settings: ForwarderSettings<'_>) -> Option<Self> {
        let scheme = settings.upstream.scheme()?.clone();
        let authority = settings.upstream.authority()?.clone();
        let host = HeaderValue::from_str(authority.as_str()).ok()?;
        let mut path = UpstreamPath::new(settings.upstream.path(), settings.escaped_slashes);
        if let Some(prefix) = settings.strip_prefix {
            path = path.strip_prefix(prefix);
        }
        let pool = UpstreamPool::new(
            scheme,
            authority,
            settings.connector,
            settings.pool,
            settings.route.into(),
            settings.pool_group,
        )
        .ok()?;
        Some(Self {
            upstream: Arc::new(Upstream {
                pool,
                path,
                host,
                preserve_host: settings.preserve_host,
                forwarded_headers: settings.forwarded_headers,
                response_timeout: settings.response_timeout,
            }),
        })
    }

    /// Rewrites a client's request for the upstream: the target normalised
    /// under the base path (origin form), hop-by-hop fields removed,
    /// `Host`, `Via` and `X-Forwarded-*` set (`X-Forwarded-For` with
    /// `client_ip`, the client's address as a header value), and HTTP/1.1
    /// as the version (the pooled connection decides what goes on the
    /// wire).
    ///
    /// Runs before the token layer: nothing the client names in
    /// `Connection` can remove what the layer and this method add, and a
    /// refused target is refused before any token is sought.
    pub(crate) fn prepare(
        &self,
        parts: &mut request::Parts,
        client_ip: Option<&HeaderValue>,
    ) -> Result<(), PathRefusal> {
        let up = &*self.upstream;
        let path_and_query = up.path.join(parts.uri.path_and_query())?;
        let headers = &mut parts.headers;
        strip_request_hop_by_hop(headers);
        if parts.version == Version::HTTP_2 {
            join_cookies(headers);
        }

        // What the client addressed: `Host`, or h2 `:authority`, or the
        // authority of an HTTP/1 absolute-form target.
        let wants_original = up.preserve_host || up.forwarded_headers;
        let original_host = if !wants_original {
            None
        } else if parts.version != Version::HTTP_2
            && parts.uri.authority().is_none()
            && let Some(host) = headers.get(header::HOST)
        {
            Some(host.clone())
        } else {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                .or_else(|| headers.get(header::HOST).cloned())
        };

        match (&original_host, up.preserve_host) {
            (Some(host), true) => headers.insert(header::HOST, host.clone()),
            _ => headers.insert(header::HOST, up.host.clone()),
        };
        if up.forwarded_headers {
            headers.append(header::VIA, via_value(parts.version));
            if let Some(ip) = client_ip {
                append_forwarded_for(headers, ip);
            }
            headers.insert(X_FORWARDED_PROTO.clone(), PROTO_HTTP.clone());
            match original_host {
                Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host),
                None => headers.remove(&X_FORWARDED_HOST),
            };
        }

        parts.uri = Uri::from(path_and_query);
        // h1 or h2 upstream: the connection (ALPN for https) decides.
        parts.version = Version::HTTP_11;
        Ok(())
    }
}

impl Service<Request<UpstreamBody>> for Forwarder {
    type Response = Response<ProxyBody>;
    type Error = ForwardError;
    type Future = ForwardFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pool queues requests itself, bounded by its own timer.
        Poll::Ready(Ok(()))
    }

    /// Sends a request [`prepare`](Self::prepare)d for the upstream; its
    /// headers are not touched here, so the token set before stays.
    fn call(&mut self, mut req: Request<UpstreamBody>) -> Self::Future {
        let up = &*self.upstream;
        let upload = upload_of(req.body());
        // hyper's HTTP/1 client sends a GET or HEAD body of unknown length
        // as no body at all unless the request asks for chunked coding (an
        // h2 connection drops the field and frames the body itself).
        if upload.is_some()
            && matches!(*req.method(), Method::GET | Method::HEAD)
            && http_body::Body::size_hint(req.body()).exact().is_none()
        {
            req.headers_mut().insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        ForwardFuture {
            response: up.pool.send(req),
            timer: tokio::time::sleep(up.response_timeout),
            limit: up.response_timeout,
            upload,
        }
    }
}

pin_project! {
    /// Response future of [`Forwarder`].
    pub(crate) struct ForwardFuture {
        response: SendFuture<UpstreamBody>,
        // When the upstream has owed its next step for too long.
        #[pin]
        timer: Sleep,
        limit: Duration,
        // How a streamed body's upload is going.
        upload: Option<Arc<Upload>>,
    }
}

impl fmt::Debug for ForwardFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForwardFuture").finish_non_exhaustive()
    }
}

/// What a failed exchange was: the client's doing when its body broke.
fn failure(upload: Option<&Upload>, error: PoolError) -> ForwardError {
    let client = upload.and_then(|u| match u.status() {
        UploadStatus::ClientTimedOut => Some(ClientFault::BodyTimeout),
        UploadStatus::ClientMalformed => Some(ClientFault::BadBody),
        _ => None,
    });
    match (client, error) {
        (Some(fault), error) => ForwardError::Client(fault, error.into()),
        (None, PoolError::Connect(e)) => ForwardError::Connect(e),
        (None, PoolError::Saturated(waited)) => ForwardError::Saturated(waited),
        (None, PoolError::Request(e)) => ForwardError::Other(e.into()),
    }
}

/// Resolves to [`ForwardError::Timeout`] once the upstream has owed its
/// next step for `limit`; re-arms `timer` until then.
fn upstream_overdue(
    mut timer: Pin<&mut Sleep>,
    cx: &mut Context<'_>,
    limit: Duration,
    upload: Option<&Upload>,
) -> Poll<ForwardError> {
    loop {
        ready!(timer.as_mut().poll(cx));
        let Some(upload) = upload else {
            return Poll::Ready(ForwardError::Timeout(limit));
        };
        let now = Instant::now();
        let deadline = match upload.status() {
            UploadStatus::Sending(at) | UploadStatus::Sent(at) => at + limit,
            // The body's own timer bounds the wait; look again later.
            UploadStatus::WaitingOnClient
            | UploadStatus::ClientTimedOut
            | UploadStatus::ClientMalformed => now + limit,
        };
        if now >= deadline {
            return Poll::Ready(ForwardError::Timeout(limit));
        }
        timer.as_mut().reset(deadline);
    }
}

impl Future for ForwardFuture {
    type Output = Result<Response<ProxyBody>, ForwardError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let upload = this.upload.as_deref();
        // Failures are counted per route by the caller.
        Poll::Ready(match Pin::new(this.response).poll(cx) {
            Poll::Ready(Ok((response, lease))) => Ok(relay(response, lease)),
            Poll::Ready(Err(e)) => Err(failure(upload, e)),
            Poll::Pending => Err(ready!(upstream_overdue(
                this.timer,
                cx,
                *this.limit,
                upload
            ))),
        })
    }
}

/// The upstream's response as the client gets it: hop-by-hop fields removed,
/// body streamed through (driving the connection it comes on, if that is
/// still leased to this response).
fn relay(response: Response<Incoming>, lease: Option<Lease<UpstreamBody>>) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    strip_response_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, ProxyBody::upstream(body, lease))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarder(upstream: &str) -> Forwarder {
        let config = crate::tls::client_config(None).unwrap();
        Forwarder::new(ForwarderSettings {
            route: "default",
            upstream: &upstream.parse().unwrap(),
            connector: crate::tls::https_connector(config, Duration::from_secs(1)),
            pool: PoolSettings::default(),
            pool_group: PoolGroup::new(1024, 1024),
            preserve_host: false,
            forwarded_headers: true,
            response_timeout: Duration::from_secs(1),
            escaped_slashes: EscapedSlashes::Keep,
            strip_prefix: None,
        })
        .unwrap()
    }

    fn client_ip() -> HeaderValue {
        HeaderValue::from_static("10.0.0.9")
    }

    fn prepared(f: &Forwarder, request: Request<()>) -> request::Parts {
        let (mut parts, ()) = request.into_parts();
        f.prepare(&mut parts, Some(&client_ip())).unwrap();
        parts
    }

    fn upstream_uri(f: &Forwarder, target: &str) -> Uri {
        prepared(f, Request::get(target).body(()).unwrap()).uri
    }

    #[tokio::test]
    async fn uri_keeps_path_and_query_and_joins_the_base_path() {
        let f = forwarder("http://up:9000");
        assert_eq!(
            upstream_uri(&f, "/a/b?x=%2F&y=a+b&&z"),
            "/a/b?x=%2F&y=a+b&&z"
        );
        assert_eq!(upstream_uri(&f, "http://127.0.0.1:8080"), "/");

        for base in ["https://up/base", "https://up/base/"] {
            let f = forwarder(base);
            assert_eq!(upstream_uri(&f, "/x?q=1"), "/base/x?q=1");
            assert_eq!(upstream_uri(&f, "/"), "/base/");
            assert_eq!(upstream_uri(&f, "/a/%2e%2e/x?q=/../"), "/base/x?q=/../");
        }
        let (mut parts, ()) = Request::get("/../x").body(()).unwrap().into_parts();
        assert_eq!(
            f.prepare(&mut parts, Some(&client_ip())),
            Err(PathRefusal::AboveBase)
        );
    }

    #[tokio::test]
    async fn fields_the_proxy_sets_survive_whatever_connection_names() {
        let f = forwarder("http://up:9000");
        let request = Request::get("/x")
            .header("host", "app.example")
            .header("connection", "Host, Via, X-Forwarded-For")
            .header("connection", "x-forwarded-proto,X-FORWARDED-HOST")
            .header("via", "1.1 client-side")
            .header("x-forwarded-for", "192.0.2.1")
            .body(())
            .unwrap();
        let parts = prepared(&f, request);
        let h = &parts.headers;
        assert!(h.get("connection").is_none());
        assert_eq!(h["host"], "up:9000");
        assert_eq!(h.get_all("via").iter().count(), 1);
        assert_eq!(h["via"], "1.1 sso-token-proxy");
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert_eq!(parts.version, Version::HTTP_11);
    }
}
