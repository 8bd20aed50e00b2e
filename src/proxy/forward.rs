//! [`Forwarder`]: the innermost service. Rewrites a request for the upstream
//! (URI, `Host`, hop-by-hop fields, `Via`/`X-Forwarded-*`, version) and sends
//! it on a pooled client; streams the response back.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri, Version, header, request};
use http_body::Body;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use pin_project_lite::pin_project;
use tower::Service;

use crate::layer::ReplayableBody;
use crate::metric_names;

use super::{
    body::ProxyBody,
    headers::{
        PROTO_HTTP, X_FORWARDED_HOST, X_FORWARDED_PROTO, append_forwarded_for, join_cookies,
        strip_request_hop_by_hop, strip_response_hop_by_hop, via_value,
    },
    path::{EscapedSlashes, PathRefusal, UpstreamPath},
    pool::{PoolError, UpstreamPool},
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
    /// The exchange failed after connecting.
    #[error("the upstream request failed")]
    Other(#[source] BoxError),
}

impl ForwardError {
    /// The `kind` label of `sso_token_proxy_upstream_errors_total`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Timeout(_) => "timeout",
            Self::Other(_) => "other",
        }
    }
}

/// The upstream and how requests are rewritten for it; shared by all
/// connections.
struct Upstream<B> {
    pool: UpstreamPool<B>,
    /// The upstream's base path; request targets are joined under it.
    path: UpstreamPath,
    host: HeaderValue,
    preserve_host: bool,
    forwarded_headers: bool,
    response_timeout: Duration,
}

/// What [`Forwarder::new`] needs to know.
pub(crate) struct ForwarderSettings<'a> {
    pub(crate) upstream: &'a Uri,
    pub(crate) connector: HttpsConnector<HttpConnector>,
    pub(crate) pool_idle_timeout: Duration,
    pub(crate) preserve_host: bool,
    pub(crate) forwarded_headers: bool,
    pub(crate) response_timeout: Duration,
    pub(crate) escaped_slashes: EscapedSlashes,
}

/// Sends requests to the one upstream. Cheap to clone; one clone per client
/// connection carries that client's address for `X-Forwarded-For`.
pub(crate) struct Forwarder<B> {
    upstream: Arc<Upstream<B>>,
    client_ip: Option<HeaderValue>,
}

impl<B> Clone for Forwarder<B> {
    fn clone(&self) -> Self {
        Self {
            upstream: Arc::clone(&self.upstream),
            client_ip: self.client_ip.clone(),
        }
    }
}

impl<B> fmt::Debug for Forwarder<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forwarder")
            .field("upstream", &self.upstream.pool)
            .finish_non_exhaustive()
    }
}

impl<B> Forwarder<B>
where
    B: Body<Data = Bytes> + ReplayableBody + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// `None` when the upstream URI has no scheme or authority.
    pub(crate) fn new(settings: ForwarderSettings<'_>) -> Option<Self> {
        let scheme = settings.upstream.scheme()?.clone();
        let authority = settings.upstream.authority()?.clone();
        let host = HeaderValue::from_str(authority.as_str()).ok()?;
        let path = UpstreamPath::new(settings.upstream.path(), settings.escaped_slashes);
        let pool = UpstreamPool::new(
            scheme,
            authority,
            settings.connector,
            settings.pool_idle_timeout,
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
            client_ip: None,
        })
    }

    /// A clone for requests from `client_ip`.
    pub(crate) fn for_client(&self, client_ip: std::net::IpAddr) -> Self {
        let text = client_ip.to_canonical().to_string();
        Self {
            upstream: Arc::clone(&self.upstream),
            client_ip: HeaderValue::from_maybe_shared(Bytes::from(text)).ok(),
        }
    }
}

impl<B> Forwarder<B> {
    /// Rewrites a client's request for the upstream: the target normalised
    /// under the base path (origin form), hop-by-hop fields removed,
    /// `Host`, `Via` and `X-Forwarded-*` set, and HTTP/1.1 as the version
    /// (the pooled connection decides what goes on the wire).
    ///
    /// Runs before the token layer: nothing the client names in
    /// `Connection` can remove what the layer and this method add, and a
    /// refused target is refused before any token is sought.
    pub(crate) fn prepare(&self, parts: &mut request::Parts) -> Result<(), PathRefusal> {
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
            if let Some(ip) = &self.client_ip {
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

impl<B> Service<Request<B>> for Forwarder<B>
where
    B: Body<Data = Bytes> + ReplayableBody + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = ForwardError;
    type Future = ForwardFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The pool takes any number of requests.
        Poll::Ready(Ok(()))
    }

    /// Sends a request [`prepare`](Self::prepare)d for the upstream; its
    /// headers are not touched here, so the token set before stays.
    fn call(&mut self, req: Request<B>) -> Self::Future {
        let up = &*self.upstream;
        let response: UpstreamResponse = Box::pin(up.pool.send(req));
        ForwardFuture {
            state: State::Sending {
                response: tokio::time::timeout(up.response_timeout, response),
                limit: up.response_timeout,
            },
        }
    }
}

/// The pool's answer; boxed to keep [`ForwardFuture`] free of the body type.
type UpstreamResponse =
    Pin<Box<dyn Future<Output = Result<Response<Incoming>, PoolError>> + Send + 'static>>;

pin_project! {
    /// Response future of [`Forwarder`].
    pub(crate) struct ForwardFuture {
        #[pin]
        state: State,
    }
}

pin_project! {
    #[project = StateProj]
    enum State {
        Sending {
            #[pin]
            response: tokio::time::Timeout<UpstreamResponse>,
            limit: Duration,
        },
    }
}

impl fmt::Debug for ForwardFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForwardFuture").finish_non_exhaustive()
    }
}

impl Future for ForwardFuture {
    type Output = Result<Response<ProxyBody>, ForwardError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = match self.project().state.project() {
            StateProj::Sending { response, limit } => match std::task::ready!(response.poll(cx)) {
                Ok(Ok(response)) => Ok(relay(response)),
                Ok(Err(PoolError::Connect(e))) => Err(ForwardError::Connect(e)),
                Ok(Err(PoolError::Request(e))) => Err(ForwardError::Other(e.into())),
                Err(_elapsed) => Err(ForwardError::Timeout(*limit)),
            },
        };
        if let Err(e) = &result {
            metrics::counter!(metric_names::UPSTREAM_ERRORS_TOTAL.name, "kind" => e.kind())
                .increment(1);
        }
        Poll::Ready(result)
    }
}

/// The upstream's response as the client gets it: hop-by-hop fields removed,
/// body streamed through.
fn relay(response: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    strip_response_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, ProxyBody::upstream(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    fn forwarder(upstream: &str) -> Forwarder<Full<Bytes>> {
        let config = crate::tls::client_config(None).unwrap();
        Forwarder::new(ForwarderSettings {
            upstream: &upstream.parse().unwrap(),
            connector: crate::tls::https_connector(config, Duration::from_secs(1)),
            pool_idle_timeout: Duration::from_secs(1),
            preserve_host: false,
            forwarded_headers: true,
            response_timeout: Duration::from_secs(1),
            escaped_slashes: EscapedSlashes::Keep,
        })
        .unwrap()
        .for_client("10.0.0.9".parse().unwrap())
    }

    fn prepared(f: &Forwarder<Full<Bytes>>, request: Request<()>) -> request::Parts {
        let (mut parts, ()) = request.into_parts();
        f.prepare(&mut parts).unwrap();
        parts
    }

    fn upstream_uri(f: &Forwarder<Full<Bytes>>, target: &str) -> Uri {
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
        assert_eq!(f.prepare(&mut parts), Err(PathRefusal::AboveBase));
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
