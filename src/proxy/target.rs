//! The request-target check: only requests meant for the configured upstream
//! are forwarded (and so given a token).
//!
//! * `CONNECT` is refused: the proxy is not a tunnel.
//! * `TRACE` is refused: its final recipient answers with the request it
//!   received, which would hand the injected token to the client (RFC 9110
//!   §9.3.8: a client must not put credentials in a `TRACE`).
//! * An HTTP/1 absolute-form target (`GET http://host/x HTTP/1.1`) must name
//!   the proxy itself or the upstream (same scheme, host and port).
//! * HTTP/2 always carries `:authority`; it is treated like an HTTP/1 `Host`
//!   header, which never decides where a request goes.
//! * Origin-form targets always go to the upstream.

use std::net::{IpAddr, SocketAddr};

use http::{Method, Uri, Version, uri::Authority};

/// Why a request is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// `CONNECT` (405).
    Connect,
    /// `TRACE` (405): the upstream would echo the token back. Also `TRACK`,
    /// and either in another letter case.
    Trace,
    /// An absolute-form target naming another origin (400).
    ForeignTarget,
    /// A target form the proxy does not forward, e.g. `*` (400).
    UnsupportedTarget,
}

impl Refusal {
    /// The refusal of a method that is never forwarded, whatever its target.
    /// Method names are case-sensitive, but a server that matched `trace`
    /// or IIS's old `TRACK` as an echo would leak the token just the same,
    /// so those spellings are refused too.
    pub fn of_method(method: &Method) -> Option<Self> {
        if method == Method::CONNECT {
            return Some(Self::Connect);
        }
        let name = method.as_str();
        let echoes = name.len() == 5
            && (name.eq_ignore_ascii_case("TRACE") || name.eq_ignore_ascii_case("TRACK"));
        echoes.then_some(Self::Trace)
    }
}

/// The upstream's origin, as absolute-form targets are compared with it.
#[derive(Debug, Clone)]
pub struct TargetCheck {
    upstream_https: bool,
    upstream_host: String,
    upstream_port: u16,
    /// A route's host (and port, if it names one): a name clients address
    /// the proxy by.
    route_host: Option<(String, Option<u16>)>,
}

impl TargetCheck {
    /// The check for requests to be forwarded to `upstream`.
    pub fn new(upstream: &Uri) -> Self {
        let upstream_https = upstream.scheme_str() == Some("https");
        let authority = upstream.authority();
        Self {
            upstream_https,
            upstream_host: authority
                .map(|a| bare_host(a).to_ascii_lowercase())
                .unwrap_or_default(),
            upstream_port: authority
                .and_then(Authority::port_u16)
                .unwrap_or(if upstream_https { 443 } else { 80 }),
            route_host: None,
        }
    }

    /// Also accepts absolute-form targets naming `host` (with `port`, when
    /// given; any port otherwise): the host a route matches on, which
    /// addresses the proxy.
    #[must_use]
    pub(crate) fn also_naming(mut self, host: &str, port: Option<u16>) -> Self {
        self.route_host = Some((host.to_ascii_lowercase(), port));
        self
    }

    /// `Ok` when the request may be forwarded. `local` is the address the
    /// request arrived on (the proxy's own listen address).
    pub fn check(
        &self,
        method: &Method,
        version: Version,
        uri: &Uri,
        local: SocketAddr,
    ) -> Result<(), Refusal> {
        if let Some(refusal) = Refusal::of_method(method) {
            return Err(refusal);
        }
        if version == Version::HTTP_2 {
            // `:authority` is the h2 Host header; `:path` is the target.
            return if uri.path().starts_with('/') {
                Ok(())
            } else {
                Err(Refusal::UnsupportedTarget)
            };
        }
        let Some(authority) = uri.authority() else {
            // Origin form; `*` (asterisk form) has no sensible mapping.
            return if uri.path().starts_with('/') {
                Ok(())
            } else {
                Err(Refusal::UnsupportedTarget)
            };
        };
        let https = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("http") => false,
            Some(s) if s.eq_ignore_ascii_case("https") => true,
            _ => return Err(Refusal::ForeignTarget),
        };
        if authority.as_str().contains('@') {
            return Err(Refusal::ForeignTarget);
        }
        let host = bare_host(authority);
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let is_upstream = https == self.upstream_https
            && port == self.upstream_port
            && host.eq_ignore_ascii_case(&self.upstream_host);
        let names_route = self
            .route_host
            .as_ref()
            .is_some_and(|(h, p)| host.eq_ignore_ascii_case(h) && p.is_none_or(|p| p == port));
        if is_upstream || names_route || names_local(host, port, local) {
            Ok(())
        } else {
            Err(Refusal::ForeignTarget)
        }
    }
}

/// The host without IPv6 brackets.
fn bare_host(authority: &Authority) -> &str {
    let host = authority.host();
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Whether `host:port` is the proxy's own listen address.
fn names_local(host: &str, port: u16, local: SocketAddr) -> bool {
    if port != local.port() {
        return false;
    }
    match host.parse::<IpAddr>() {
        Ok(ip) => {
            let (ip, own) = (ip.to_canonical(), local.ip().to_canonical());
            ip == own || (ip.is_loopback() && own.is_unspecified())
        }
        Err(_) => {
            host.eq_ignore_ascii_case("localhost")
                && (local.ip().is_loopback() || local.ip().is_unspecified())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> SocketAddr {
        "127.0.0.1:8080".parse().unwrap()
    }

    fn check(
        upstream: &str,
        method: Method,
        version: Version,
        target: &str,
    ) -> Result<(), Refusal> {
        TargetCheck::new(&upstream.parse().unwrap()).check(
            &method,
            version,
            &target.parse().unwrap(),
            local(),
        )
    }

    #[test]
    fn origin_form_is_always_forwarded() {
        assert_eq!(
            check("http://up:9000", Method::GET, Version::HTTP_11, "/x?y"),
            Ok(())
        );
        assert_eq!(
            check("http://up:9000", Method::POST, Version::HTTP_10, "/"),
            Ok(())
        );
    }

    #[test]
    fn connect_is_refused() {
        assert_eq!(
            check(
                "http://up:9000",
                Method::CONNECT,
                Version::HTTP_11,
                "other:443"
            ),
            Err(Refusal::Connect)
        );
        assert_eq!(
            check(
                "http://up:9000",
                Method::CONNECT,
                Version::HTTP_2,
                "https://other:443/"
            ),
            Err(Refusal::Connect)
        );
    }

    #[test]
    fn trace_is_refused_whatever_its_target() {
        for (version, target) in [
            (Version::HTTP_11, "/x"),
            (Version::HTTP_11, "http://up:9000/x"),
            (Version::HTTP_2, "http://up:9000/x"),
        ] {
            assert_eq!(
                check("http://up:9000", Method::TRACE, version, target),
                Err(Refusal::Trace),
                "{version:?} {target}"
            );
        }
        for spelling in ["trace", "Trace", "TRACK", "track"] {
            let method = Method::from_bytes(spelling.as_bytes()).unwrap();
            assert_eq!(
                Refusal::of_method(&method),
                Some(Refusal::Trace),
                "{spelling}"
            );
        }
        for method in [Method::OPTIONS, Method::GET, Method::PATCH] {
            assert_eq!(Refusal::of_method(&method), None, "{method}");
        }
        let tracer = Method::from_bytes(b"TRACER").unwrap();
        assert_eq!(Refusal::of_method(&tracer), None);
    }

    #[test]
    fn absolute_form_must_name_the_upstream_or_the_proxy() {
        let up = "http://Up.Example:9000/base";
        assert_eq!(
            check(
                up,
                Method::GET,
                Version::HTTP_11,
                "http://up.example:9000/x"
            ),
            Ok(())
        );
        assert_eq!(
            check(up, Method::GET, Version::HTTP_11, "http://127.0.0.1:8080/x"),
            Ok(())
        );
        assert_eq!(
            check(up, Method::GET, Version::HTTP_11, "http://localhost:8080/x"),
            Ok(())
        );
        for foreign in [
            "http://other.host/x",
            "http://up.example/x",
            "http://up.example:9001/x",
            "https://up.example:9000/x",
            "https://other.host/x",
            "http://127.0.0.1:8081/x",
            "http://user@up.example:9000/x",
            "ftp://up.example:9000/x",
        ] {
            assert_eq!(
                check(up, Method::GET, Version::HTTP_11, foreign),
                Err(Refusal::ForeignTarget),
                "{foreign}"
            );
        }
        let tls = "https://api.example.com";
        assert_eq!(
            check(
                tls,
                Method::GET,
                Version::HTTP_11,
                "https://api.example.com:443/x"
            ),
            Ok(())
        );
        assert_eq!(
            check(
                tls,
                Method::GET,
                Version::HTTP_11,
                "http://api.example.com/x"
            ),
            Err(Refusal::ForeignTarget)
        );
    }

    #[test]
    fn h2_authority_is_like_a_host_header() {
        assert_eq!(
            check(
                "http://up:9000",
                Method::GET,
                Version::HTTP_2,
                "http://127.0.0.1:8080/x"
            ),
            Ok(())
        );
        assert_eq!(
            check(
                "http://up:9000",
                Method::GET,
                Version::HTTP_2,
                "https://anything.else/x"
            ),
            Ok(())
        );
    }

    #[test]
    fn a_routes_host_addresses_the_proxy() {
        let check =
            TargetCheck::new(&"http://up:9000".parse().unwrap()).also_naming("API.internal", None);
        let target =
            |t: &str| check.check(&Method::GET, Version::HTTP_11, &t.parse().unwrap(), local());
        assert_eq!(target("http://api.internal/x"), Ok(()));
        assert_eq!(target("http://api.internal:8080/x"), Ok(()));
        assert_eq!(
            target("http://other.internal/x"),
            Err(Refusal::ForeignTarget)
        );
        let check = TargetCheck::new(&"http://up:9000".parse().unwrap())
            .also_naming("api.internal", Some(8443));
        let target =
            |t: &str| check.check(&Method::GET, Version::HTTP_11, &t.parse().unwrap(), local());
        assert_eq!(target("http://api.internal:8443/x"), Ok(()));
        assert_eq!(target("http://api.internal/x"), Err(Refusal::ForeignTarget));
    }

    #[test]
    fn asterisk_form_is_refused() {
        assert_eq!(
            check("http://up:9000", Method::OPTIONS, Version::HTTP_11, "*"),
            Err(Refusal::UnsupportedTarget)
        );
    }
}
