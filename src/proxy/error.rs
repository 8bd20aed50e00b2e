//! [`ProxyError`] and the JSON answers the proxy gives instead of forwarding.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use super::{body::ProxyBody, forward::ForwardError, path::PathRefusal, target::Refusal};
use crate::{
    cache::TokenUnavailable, oidc::ServiceErrorKind, tls::TlsConfigError, token::TokenError,
};

/// Why a [`Proxy`](super::Proxy) could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The upstream URL is not an absolute `http://` or `https://` URL.
    #[error(
        "`{0}` is not usable as the upstream; write an absolute URL such as http://127.0.0.1:9000"
    )]
    Upstream(String),
    /// The TLS client configuration could not be built.
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    /// [`Proxy::with_routes`](super::Proxy::with_routes) was given no
    /// route.
    #[error("no routes: a proxy needs at least one")]
    NoRoutes,
    /// A route's setting is not usable.
    #[error("route `{route}`: {key}: {reason}")]
    Route {
        /// The route's name.
        route: String,
        /// The setting (`upstream`, `host`, `path_prefix`, `token_header`,
        /// `upstream_ca_file`, `name`).
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

impl ProxyError {
    /// The config key the problem is about, for `FILE: key: reason` lines
    /// (for a [`Route`](Self::Route) problem, the route's key without the
    /// route).
    pub fn config_key(&self) -> &'static str {
        match self {
            Self::Upstream(_) | Self::NoRoutes => "proxy.upstream",
            Self::Tls(TlsConfigError::CaFile { .. }) => "proxy.upstream_ca_file",
            Self::Tls(_) => "proxy.upstream",
            Self::Route { key, .. } => key,
        }
    }
}

fn json(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The answer to an HTTP/1 request head larger than
/// `max_request_header_bytes`, which hyper let through because it arrived
/// whole in one read (hyper checks its limit only on a head still
/// incomplete).
pub(super) fn head_too_large_response() -> Response<ProxyBody> {
    let mut response = json(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        r#"{"error":"request_head_too_large","message":"the request head is larger than this proxy's max_request_header_bytes; nothing was forwarded"}"#,
    );
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// `405` with the methods the proxy forwards.
fn method_not_allowed(body: &'static str) -> Response<ProxyBody> {
    let mut response = json(StatusCode::METHOD_NOT_ALLOWED, body);
    response.headers_mut().insert(
        header::ALLOW,
        HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
    );
    response
}

/// The answer to a request that is not forwarded.
pub(super) fn refusal_response(refusal: Refusal) -> Response<ProxyBody> {
    match refusal {
        Refusal::Connect => method_not_allowed(
            r#"{"error":"method_not_allowed","message":"CONNECT is not supported: this proxy forwards requests to its one configured upstream and does not open tunnels"}"#,
        ),
        Refusal::Trace => method_not_allowed(
            r#"{"error":"method_not_allowed","message":"TRACE is not forwarded: the upstream would answer with the request as it received it, credentials included"}"#,
        ),
        Refusal::ForeignTarget => json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"foreign_target","message":"the request target names another host; this proxy forwards only to its configured upstream, so send origin-form requests (GET /path)"}"#,
        ),
        Refusal::UnsupportedTarget => json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"unsupported_target","message":"the request target must be a path (origin form, e.g. GET /path)"}"#,
        ),
    }
}

/// The answer to a request no route takes: it names no upstream (which
/// would tell a client what else sits behind the proxy).
pub(super) fn no_route_response() -> Response<ProxyBody> {
    json(
        StatusCode::NOT_FOUND,
        r#"{"error":"no_route","message":"no route of this proxy takes this request (host and path); nothing was forwarded"}"#,
    )
}

/// The answer to a target whose path is refused.
pub(super) fn path_refusal_response(refusal: PathRefusal) -> Response<ProxyBody> {
    match refusal {
        PathRefusal::AboveBase => json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"path_outside_base","message":"the request path climbs above the upstream's base path (dot segments, also percent-encoded or behind encoded slashes); send a path without them"}"#,
        ),
        PathRefusal::EscapedSlash => json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"escaped_slash","message":"the request path holds an encoded slash (%2F, %5C) or a backslash, which proxy.escaped_slashes = \"reject\" refuses"}"#,
        ),
        PathRefusal::NotAPath => refusal_response(Refusal::UnsupportedTarget),
    }
}

/// The answer when the client's request body broke off while it was read.
pub(super) fn bad_body_response() -> Response<ProxyBody> {
    json(
        StatusCode::BAD_REQUEST,
        r#"{"error":"bad_request_body","message":"the request body could not be read completely"}"#,
    )
}

/// The answer when the client stopped sending its request body.
pub(super) fn body_timeout_response() -> Response<ProxyBody> {
    json(
        StatusCode::REQUEST_TIMEOUT,
        r#"{"error":"request_body_timeout","message":"the request body did not arrive within proxy.request_body_timeout"}"#,
    )
}

/// The answer when the upstream gave none.
pub(super) fn upstream_error_response(error: &ForwardError) -> Response<ProxyBody> {
    match error {
        ForwardError::Connect(_) => json(
            StatusCode::BAD_GATEWAY,
            r#"{"error":"upstream_unavailable","message":"cannot connect to the upstream; check that it is running and that proxy.upstream points at it"}"#,
        ),
        ForwardError::Timeout(_) => json(
            StatusCode::GATEWAY_TIMEOUT,
            r#"{"error":"upstream_timeout","message":"the upstream sent no response within proxy.upstream_response_timeout"}"#,
        ),
        ForwardError::Saturated(_) => {
            let mut response = json(
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"error":"upstream_saturated","message":"every upstream connection (proxy.upstream_max_connections) stayed busy for proxy.upstream_queue_timeout; try again"}"#,
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
        ForwardError::Other(_) => json(
            StatusCode::BAD_GATEWAY,
            r#"{"error":"upstream_error","message":"the exchange with the upstream failed before a response arrived"}"#,
        ),
        // Answered as the client's fault before this is reached.
        ForwardError::Client(..) => bad_body_response(),
    }
}

/// A request to a per-caller route without the caller's token: `401`,
/// never forwarded, no exchange.
pub(super) fn caller_token_missing_response() -> Response<ProxyBody> {
    let mut response = json(
        StatusCode::UNAUTHORIZED,
        r#"{"error":"missing_caller_token","message":"this route exchanges the caller's token: send exactly one, as its inbound header says (Authorization: Bearer <token> by default)"}"#,
    );
    let headers = response.headers_mut();
    headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The answer when a caller's token could not be exchanged: Identity
/// Center's refusal of that token is the caller's (`401`, `403` for
/// `AccessDenied`); anything else (throttling, a fault, the proxy's own
/// setup) is `503` with `Retry-After`. The body names the error's kind,
/// never the token.
pub(super) fn caller_refused_response(error: &TokenUnavailable) -> Response<ProxyBody> {
    let kind = match &error.source {
        TokenError::Oidc(e) => e.service_kind(),
        _ => None,
    };
    let status = match kind {
        Some(
            ServiceErrorKind::InvalidGrant
            | ServiceErrorKind::ExpiredToken
            | ServiceErrorKind::InvalidScope
            | ServiceErrorKind::InvalidRequest,
        ) => StatusCode::UNAUTHORIZED,
        Some(ServiceErrorKind::AccessDenied) => StatusCode::FORBIDDEN,
        _ => return crate::layer::unavailable_response(error),
    };
    let body = serde_json::json!({
        "error": "caller_token_refused",
        "kind": error.kind(),
        "message": format!(
            "Identity Center refused the caller's token ({}); get a new one",
            error.kind()
        ),
    });
    let mut response = Response::new(ProxyBody::full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt as _;

    use super::*;

    #[tokio::test]
    async fn answers_are_json_with_error_and_message() {
        let responses = [
            refusal_response(Refusal::Connect),
            refusal_response(Refusal::ForeignTarget),
            refusal_response(Refusal::UnsupportedTarget),
            path_refusal_response(PathRefusal::AboveBase),
            path_refusal_response(PathRefusal::EscapedSlash),
            path_refusal_response(PathRefusal::NotAPath),
            bad_body_response(),
            body_timeout_response(),
            upstream_error_response(&ForwardError::Timeout(std::time::Duration::from_secs(1))),
            upstream_error_response(&ForwardError::Saturated(std::time::Duration::from_secs(1))),
            upstream_error_response(&ForwardError::Other("x".into())),
        ];
        for response in responses {
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(v["error"].is_string() && v["message"].is_string(), "{v}");
        }
    }
}
