//! Routes: which requests a listener sends where, with which token in which
//! header.
//!
//! A [`Route`] matches on the request's host (`Host`, h2 `:authority`, or an
//! HTTP/1 absolute-form target's authority; case-insensitive, the port
//! ignored unless the route names one) and on a path prefix (at a segment
//! boundary, on the path normalised as it will be forwarded, so `/v1/../x`
//! is not under `/v1`). The first route in order whose host and prefix
//! match takes the request; none: `404` naming no upstream, and no token is
//! sought.
//!
//! The table is built once per listener. A listener with a single route
//! that matches everything does no matching at all.

use std::{path::PathBuf, sync::Arc};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Uri, header};

use super::{
    EscapedSlashes, ProxyError,
    metrics::{ProxyMetrics, RouteMetrics},
    path::{self, PathRefusal},
    service::Stack,
    target::TargetCheck,
};
use crate::{
    cache::{CallerTokens, TokenCache},
    layer::TokenFormat,
    secret::Secret,
    token::Token,
};

// === impl Route ===

/// One route of a [`Proxy`](super::Proxy): which requests it takes, the
/// upstream they go to, and the token they carry there.
///
/// Settings left unset take the [`ProxyConfig`](super::ProxyConfig)'s
/// (`preserve_host`, `forwarded_headers`, `escaped_slashes`,
/// `upstream_ca_file`). Problems with the host, prefix or token header are
/// reported by [`Proxy::with_routes`](super::Proxy::with_routes).
#[derive(Debug, Clone)]
pub struct Route {
    pub(super) name: String,
    pub(super) upstream: Uri,
    pub(super) cache: TokenCache,
    pub(super) host: Option<String>,
    pub(super) path_prefix: Option<String>,
    pub(super) strip_prefix: bool,
    pub(super) token_header: HeaderName,
    pub(super) token_format: TokenFormat,
    pub(super) preserve_host: Option<bool>,
    pub(super) forwarded_headers: Option<bool>,
    pub(super) escaped_slashes: Option<EscapedSlashes>,
    pub(super) upstream_ca_file: Option<PathBuf>,
    pub(super) per_caller: Option<(CallerTokens, HeaderName)>,
}

impl Route {
    /// A route named `name` (the `route` label of its metrics) that takes
    /// every request to `upstream` with `Authorization: Bearer <token>`
    /// from `cache`.
    pub fn new(name: impl Into<String>, upstream: Uri, cache: TokenCache) -> Self {
        Self {
            name: name.into(),
            upstream,
            cache,
            host: None,
            path_prefix: None,
            strip_prefix: false,
            token_header: header::AUTHORIZATION,
            token_format: TokenFormat::bearer(),
            preserve_host: None,
            forwarded_headers: None,
            escaped_slashes: None,
            upstream_ca_file: None,
            per_caller: None,
        }
    }

    /// Exchanges each caller's token instead of sending the cache's: the
    /// caller's token is taken from `inbound_header` (after `Bearer ` when
    /// the value starts with it), that header is removed, and the request
    /// goes upstream with the token `callers` holds for that caller, in
    /// the route's token header and format. A request without exactly one
    /// such header is answered `401` and not forwarded. The route's
    /// `cache` is then not used.
    #[must_use]
    pub fn per_caller(mut self, callers: CallerTokens, inbound_header: HeaderName) -> Self {
        self.per_caller = Some((callers, inbound_header));
        self
    }

    /// Takes only requests for `host` (`name` or `name:port`).
    #[must_use]
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.host = Some(host.into());
        self
    }

    /// Takes only requests whose path is `prefix` or under it (e.g. `/v1`
    /// takes `/v1` and `/v1/x`, not `/v10`).
    #[must_use]
    pub fn path_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.path_prefix = Some(prefix.into());
        self
    }

    /// Removes the path prefix before the path is joined with the
    /// upstream's base path (default `false`).
    #[must_use]
    pub fn strip_prefix(mut self, strip: bool) -> Self {
        self.strip_prefix = strip;
        self
    }

    /// Sends the token in `name` instead of `Authorization`.
    #[must_use]
    pub fn token_header(mut self, name: HeaderName) -> Self {
        self.token_header = name;
        self
    }

    /// Writes the token's header value as `format` says (default
    /// `Bearer {token}`).
    #[must_use]
    pub fn token_format(mut self, format: TokenFormat) -> Self {
        self.token_format = format;
        self
    }

    /// Keeps the client's `Host` (default: the proxy's setting).
    #[must_use]
    pub fn preserve_host(mut self, preserve: bool) -> Self {
        self.preserve_host = Some(preserve);
        self
    }

    /// Adds `Via` and `X-Forwarded-*` (default: the proxy's setting).
    #[must_use]
    pub fn forwarded_headers(mut self, add: bool) -> Self {
        self.forwarded_headers = Some(add);
        self
    }

    /// What escaped slashes in a path do (default: the proxy's setting).
    #[must_use]
    pub fn escaped_slashes(mut self, policy: EscapedSlashes) -> Self {
        self.escaped_slashes = Some(policy);
        self
    }

    /// Extra CA certificates for an https upstream (default: the proxy's).
    #[must_use]
    pub fn upstream_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.upstream_ca_file = Some(path.into());
        self
    }

    /// The route's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A [`ProxyError::Route`] about `key` of this route.
    pub(super) fn error(&self, key: &'static str, reason: impl Into<String>) -> ProxyError {
        ProxyError::Route {
            route: self.name.clone(),
            key,
            reason: reason.into(),
        }
    }
}

// === settings checks (shared with the config file) ===

/// A route's host: lower case, without brackets, and a port if one was
/// given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostMatch {
    host: Box<str>,
    port: Option<u16>,
}

impl HostMatch {
    /// `name` or `name:port` (IPv6 in brackets).
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let authority: http::uri::Authority = text.parse().map_err(|_| {
            format!(
                "`{text}` is not a host name; write e.g. \"api.internal\" or \"api.internal:8443\""
            )
        })?;
        if authority.as_str().contains('@') || authority.host().is_empty() {
            return Err(format!(
                "`{text}` is not a host name; write e.g. \"api.internal\""
            ));
        }
        Ok(Self {
            host: bare_host(authority.host()).to_ascii_lowercase().into(),
            port: authority.port_u16(),
        })
    }

    /// Whether a request for `host` (as `Host` or `:authority` carry it)
    /// is one for this host.
    fn matches(&self, requested: &str) -> bool {
        let (host, port) = split_host_port(requested);
        host.eq_ignore_ascii_case(&self.host) && self.port.is_none_or(|p| port == Some(p))
    }

    /// Whether `other` is this host as far as a request can tell: equal
    /// names, and this port unset or equal.
    pub(crate) fn covers(&self, other: &Self) -> bool {
        self.host == other.host && (self.port.is_none() || self.port == other.port)
    }

    /// The name and port, for the target check.
    pub(super) fn parts(&self) -> (&str, Option<u16>) {
        (&self.host, self.port)
    }
}

/// `host[:port]` of a `Host` value; the port `None` when absent or bad.
fn split_host_port(value: &str) -> (&str, Option<u16>) {
    if let Some(rest) = value.strip_prefix('[') {
        // `[v6]` or `[v6]:port`
        return match rest.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (value, None),
        };
    }
    match value.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, port.parse().ok()),
        _ => (value, None),
    }
}

fn bare_host(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// A route's path prefix as matched: starting with `/`, without a trailing
/// `/`; `None` for `/` (every path). It must be a plain path: segments of
/// unreserved characters and sub-delimiters, no dot or empty segments, no
/// percent-encoding, query or fragment.
pub(crate) fn parse_path_prefix(text: &str) -> Result<Option<Bytes>, String> {
    if !text.starts_with('/') {
        return Err(format!("`{text}` must start with `/`, e.g. \"/v1/\""));
    }
    let trimmed = text.strip_suffix('/').unwrap_or(text);
    if trimmed.is_empty() {
        return Ok(None);
    }
    for segment in trimmed[1..].split('/') {
        if segment.is_empty() || segment == "." || segment == ".." {
            return Err(format!(
                "`{text}` has an empty or dot segment; write the normalised path, e.g. \"/v1/items\""
            ));
        }
        let plain = segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b));
        if !plain {
            return Err(format!(
                "`{text}` may hold only letters, digits and -._~!$&'()*+,;=:@ between slashes (no %-encoding, query or fragment)"
            ));
        }
    }
    Ok(Some(Bytes::copy_from_slice(trimmed.as_bytes())))
}

/// Whether every path under the path prefix `inner` is also under `outer`
/// (both as [`parse_path_prefix`] gives them).
pub(crate) fn prefix_covers(outer: &[u8], inner: &[u8]) -> bool {
    path::prefix_len(inner, outer).is_some()
}

/// Headers the token must never go in: hop-by-hop fields (the next hop
/// consumes them), fields that frame or route the message, and those the
/// proxy sets itself.
const FORBIDDEN_TOKEN_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
    "host",
    "content-length",
    "content-type",
    "content-encoding",
    "expect",
    "cookie",
    "via",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
];

/// Whether the token may be sent in `name`.
pub(crate) fn check_token_header(name: &HeaderName) -> Result<(), String> {
    if FORBIDDEN_TOKEN_HEADERS.contains(&name.as_str()) {
        return Err(format!(
            "`{name}` cannot carry the token (hop-by-hop, message framing, cookies, or set by the proxy); use e.g. \"Authorization\" or \"X-Api-Token\""
        ));
    }
    Ok(())
}

// === the table ===

/// What a route matches on.
#[derive(Debug, Clone)]
struct RouteMatch {
    host: Option<HostMatch>,
    prefix: Option<Bytes>,
}

impl RouteMatch {
    fn matches(&self, host: Option<&str>, path: &[u8]) -> bool {
        if let Some(want) = &self.host
            && !host.is_some_and(|h| want.matches(h))
        {
            return false;
        }
        self.prefix
            .as_ref()
            .is_none_or(|p| path::prefix_len(path, p).is_some())
    }
}

/// A route ready to serve: its matcher, its target check, its stack (token
/// layer over its forwarder, with its own upstream pool) and its metrics.
#[derive(Debug)]
pub(super) struct ActiveRoute {
    matcher: RouteMatch,
    pub(super) check: TargetCheck,
    pub(super) stack: Stack,
    pub(super) metrics: Arc<RouteMetrics>,
    /// Set for a route that exchanges each caller's token.
    pub(super) per_caller: Option<Arc<PerCaller>>,
}

/// A per-caller route's settings at request time.
#[derive(Debug)]
pub(super) struct PerCaller {
    pub(super) tokens: CallerTokens,
    inbound_header: HeaderName,
    token_header: HeaderName,
    token_format: TokenFormat,
}

impl PerCaller {
    /// Removes every inbound header from `headers` and returns the
    /// caller's token: `None` unless there was exactly one, non-empty.
    pub(super) fn take_inbound(&self, headers: &mut HeaderMap) -> Option<Secret> {
        let mut values = match headers.entry(&self.inbound_header) {
            http::header::Entry::Occupied(e) => e.remove_entry_mult().1,
            http::header::Entry::Vacant(_) => return None,
        };
        let value = values.next()?;
        if values.next().is_some() {
            return None;
        }
        let text = value.to_str().ok()?.trim();
        if text.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let token = match text.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => text[7..].trim_start(),
            _ => text,
        };
        (!token.is_empty()).then(|| Secret::new(token))
    }

    /// Puts `token` on the request as the route's header and format say.
    pub(super) fn apply(&self, headers: &mut HeaderMap, token: &Token) {
        let value = if self.token_format.is_bearer() {
            token.header_value().clone()
        } else {
            self.token_format.value(token)
        };
        headers.insert(self.token_header.clone(), value);
    }
}

impl ActiveRoute {
    pub(super) fn new(
        route: &Route,
        check: TargetCheck,
        stack: Stack,
        listener: &Arc<ProxyMetrics>,
    ) -> Result<Self, ProxyError> {
        let host = route
            .host
            .as_deref()
            .map(HostMatch::parse)
            .transpose()
            .map_err(|reason| route.error("host", reason))?;
        let prefix = route
            .path_prefix
            .as_deref()
            .map(parse_path_prefix)
            .transpose()
            .map_err(|reason| route.error("path_prefix", reason))?
            .flatten();
        let check = match &host {
            Some(h) => {
                let (name, port) = h.parts();
                check.also_naming(name, port)
            }
            None => check,
        };
        let per_caller = match &route.per_caller {
            Some((tokens, inbound_header)) => {
                check_token_header(inbound_header)
                    .map_err(|reason| route.error("inbound_header", reason))?;
                Some(Arc::new(PerCaller {
                    tokens: tokens.clone(),
                    inbound_header: inbound_header.clone(),
                    token_header: route.token_header.clone(),
                    token_format: route.token_format.clone(),
                }))
            }
            None => None,
        };
        Ok(Self {
            matcher: RouteMatch { host, prefix },
            check,
            stack,
            metrics: Arc::new(RouteMetrics::new(&route.name, Arc::clone(listener))),
            per_caller,
        })
    }
}

/// Why no route took a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unrouted {
    /// The path cannot be normalised (answered like any such path).
    Path(PathRefusal),
    /// No route matches (`404`).
    NoRoute,
}

/// The routes of one listener, in order; built once.
#[derive(Debug)]
pub(super) struct RouteTable {
    routes: Box<[ActiveRoute]>,
    /// One route that takes everything: no matching.
    single: bool,
    /// Metrics of requests no route took (`route=""`).
    pub(super) unrouted: Arc<RouteMetrics>,
}

impl RouteTable {
    /// The table of one listener, whose metrics are `listener`.
    pub(super) fn new(routes: Vec<ActiveRoute>, listener: &Arc<ProxyMetrics>) -> Self {
        let single = routes.len() == 1
            && routes[0].matcher.host.is_none()
            && routes[0].matcher.prefix.is_none();
        Self {
            routes: routes.into_boxed_slice(),
            single,
            unrouted: Arc::new(RouteMetrics::new("", Arc::clone(listener))),
        }
    }

    /// The route that takes a request for `uri` with `headers`.
    pub(super) fn select(&self, uri: &Uri, headers: &HeaderMap) -> Result<&ActiveRoute, Unrouted> {
        if self.single {
            return Ok(&self.routes[0]);
        }
        let path = path::normalise(uri.path().as_bytes()).map_err(Unrouted::Path)?;
        let host = request_host(uri, headers);
        self.routes
            .iter()
            .find(|r| r.matcher.matches(host, &path))
            .ok_or(Unrouted::NoRoute)
    }
}

/// The host a request is for: an HTTP/1 absolute-form target's or h2's
/// `:authority`, else `Host`.
fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(http::uri::Authority::as_str)
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_without_case_and_with_a_port_only_when_named() {
        let h = HostMatch::parse("API.internal").unwrap();
        assert!(h.matches("api.internal"));
        assert!(h.matches("Api.Internal:8080"));
        assert!(!h.matches("api.internal.evil"));
        assert!(!h.matches("other"));
        let p = HostMatch::parse("api.internal:8443").unwrap();
        assert!(p.matches("api.internal:8443"));
        assert!(!p.matches("api.internal"));
        assert!(!p.matches("api.internal:8444"));
        let v6 = HostMatch::parse("[::1]:9000").unwrap();
        assert!(v6.matches("[::1]:9000"));
        assert!(!v6.matches("[::1]"));
        assert!(HostMatch::parse("api.internal").unwrap().covers(&p));
        assert!(!p.covers(&HostMatch::parse("api.internal").unwrap()));
        for bad in ["", "user@host", "http://x", "a b", "/x"] {
            assert!(HostMatch::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn path_prefixes_are_plain_paths() {
        assert_eq!(parse_path_prefix("/").unwrap(), None);
        assert_eq!(parse_path_prefix("/v1/").unwrap().unwrap(), "/v1");
        assert_eq!(
            parse_path_prefix("/v1/items").unwrap().unwrap(),
            "/v1/items"
        );
        for bad in [
            "v1", "/v1//x", "/./v1", "/v1/..", "/v%31", "/v1?x", "/v1#x", "/a b",
        ] {
            assert!(parse_path_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_token_stays_out_of_headers_that_are_not_the_requests_own() {
        for ok in ["authorization", "x-api-token", "private-token"] {
            check_token_header(&HeaderName::from_static(ok)).unwrap();
        }
        for bad in [
            "connection",
            "te",
            "host",
            "content-length",
            "transfer-encoding",
            "cookie",
            "x-forwarded-for",
            "proxy-authorization",
        ] {
            assert!(
                check_token_header(&HeaderName::from_static(bad)).is_err(),
                "{bad}"
            );
        }
    }
}
