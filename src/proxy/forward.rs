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

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderValue, Request, Response, Uri, Version, header, uri::PathAndQuery};
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
        strip_hop_by_hop, via_value,
    },
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
    /// The upstream's path without its trailing `/`; empty when it has none.
    base_path: Bytes,
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
        let base_path =
            Bytes::copy_from_slice(settings.upstream.path().trim_end_matches('/').as_bytes());
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
                base_path,
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
    /// The origin-form URI the upstream is sent for a request target: its
    /// path and query, under the upstream's base path.
    fn upstream_uri(&self, target: Uri) -> Result<Uri, http::Error> {
        let up = &*self.upstream;
        let path_and_query = target.into_parts().path_and_query;
        let path_and_query = match (up.base_path.is_empty(), path_and_query) {
            (true, Some(pq)) => pq,
            (true, None) => PathAndQuery::from_static("/"),
            (false, pq) => {
                let rest = pq.as_ref().map_or("/", PathAndQuery::as_str);
                let mut joined = BytesMut::with_capacity(up.base_path.len() + rest.len());
                joined.put_slice(&up.base_path);
                joined.put_slice(rest.as_bytes());
                PathAndQuery::from_maybe_shared(joined.freeze())?
            }
        };
        Ok(Uri::from(path_and_query))
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

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let up = &*self.upstream;
        let (mut parts, body) = req.into_parts();
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
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

        parts.uri = match self.upstream_uri(std::mem::take(&mut parts.uri)) {
            Ok(uri) => uri,
            Err(e) => {
                return ForwardFuture::failed(ForwardError::Other(e.into()));
            }
        };
        // h1 or h2 upstream: the connection (ALPN for https) decides.
        parts.version = Version::HTTP_11;

        let response: UpstreamResponse = Box::pin(up.pool.send(Request::from_parts(parts, body)));
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
        Failed {
            error: Option<ForwardError>,
        },
    }
}

impl ForwardFuture {
    fn failed(error: ForwardError) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
        }
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
            StateProj::Failed { error } => {
                Err(error.take().expect("ForwardFuture polled after completion"))
            }
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
    strip_hop_by_hop(&mut parts.headers);
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
        })
        .unwrap()
    }

    #[tokio::test]
    async fn uri_keeps_path_and_query_and_joins_the_base_path() {
        let f = forwarder("http://up:9000");
        let uri = f
            .upstream_uri("/a/b?x=%2F&y=a+b&&z".parse().unwrap())
            .unwrap();
        assert_eq!(uri, "/a/b?x=%2F&y=a+b&&z");
        let uri = f
            .upstream_uri("http://127.0.0.1:8080".parse().unwrap())
            .unwrap();
        assert_eq!(uri, "/");

        for base in ["https://up/base", "https://up/base/"] {
            let f = forwarder(base);
            assert_eq!(
                f.upstream_uri("/x?q=1".parse().unwrap()).unwrap(),
                "/base/x?q=1"
            );
            assert_eq!(f.upstream_uri("/".parse().unwrap()).unwrap(), "/base/");
        }
    }
}
