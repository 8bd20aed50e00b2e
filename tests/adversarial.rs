//! The proxy against hostile clients, on real sockets with raw bytes: an
//! in-process `Proxy` on 127.0.0.1:0 over a counting token source, and a
//! recording upstream. Every test asserts what reached the upstream (and
//! how many tokens were fetched), not only what the client was answered.
//! `SECURITY.md` maps each guarantee to the tests here.
//!
//! Run with `cargo test --test adversarial`.

#[path = "support/adversary.rs"]
#[allow(dead_code)] // Each suite uses the clients it needs.
mod adversary;
#[path = "support/proxy_harness.rs"]
#[allow(dead_code)] // Shared with tests/proxy.rs, which uses other parts.
mod harness;

use std::time::Duration;

use adversary::{
    END_HEADERS, END_STREAM, HEADERS, PROTOCOL_ERROR, RST_STREAM, RawConn, RawH2, exchange, frame,
    get_fields, header_block, static_status,
};
use harness::{RunningProxy, Upstream, empty, h2c_client, proxy_config, send};
use http::{Request, StatusCode, Version};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::watch,
    task::JoinHandle,
    time::Instant,
};

/// A proxy in front of `upstream` under the base path `/api`.
async fn proxy_with_base(upstream: &Upstream) -> RunningProxy {
    RunningProxy::start(proxy_config(&format!("{}/api", upstream.url()))).await
}

/// A raw keep-alive GET for `target` with extra header lines.
fn get(target: &str, extra: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: app.example\r\n{extra}\r\n").into_bytes()
}

// === 1. The injected token cannot be removed by the request ===

/// `Connection` lines that name `Authorization`, as a client could write
/// them: any case, among other options, with tabs, over several lines.
const NAMING_AUTHORIZATION: [&str; 8] = [
    "Connection: Authorization\r\n",
    "Connection: authorization\r\n",
    "connection: AUTHORIZATION\r\n",
    "Connection: keep-alive, Authorization\r\n",
    "Connection: x-a,\tAuThOrIzAtIoN ,x-b\r\n",
    "Connection: keep-alive\r\nConnection: authorization\r\n",
    "Connection: x-a\r\nconnection: x-b, Authorization\r\nAuthorization: Bearer client\r\n",
    "Authorization: Basic Y2xpZW50\r\nConnection: ,,authorization,,\r\n",
];

#[tokio::test]
async fn connection_naming_authorization_never_strips_the_token() {
    let upstream = Upstream::start().await;
    // A protected resource: no token, 401 (which would make the proxy drop
    // its token and fetch another).
    upstream.require_authorization();
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;

    // Twenty keep-alive connections of ten requests each, every variant on
    // every connection.
    let mut variants = NAMING_AUTHORIZATION.iter().cycle();
    let mut sent = 0;
    for c in 0..20 {
        let mut conn = RawConn::connect(proxy.addr).await;
        for r in 0..10 {
            let connection = variants.next().unwrap();
            conn.send(&get(&format!("/r/{c}/{r}"), connection)).await;
            let answer = conn.response().await.expect("a response");
            assert_eq!(answer.status, 200, "{connection:?}: {answer:?}");
            sent += 1;
        }
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), sent);
    for s in &seen {
        assert_eq!(s.all("authorization"), ["Bearer token-1"], "{}", s.uri);
        assert!(
            s.header("connection")
                .is_none_or(|c| !c.contains("uthoriz"))
        );
    }
    assert_eq!(proxy.source.calls(), 1, "no token was refetched");
}

#[tokio::test]
async fn fields_the_proxy_sets_survive_connection_naming_them() {
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.preserve_host = true;
    let proxy = RunningProxy::start(config).await;
    let answer = exchange(
        proxy.addr,
        b"GET /named HTTP/1.1\r\nHost: app.example\r\n\
          Connection: Host, Via, X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, close\r\n\
          Via: 1.0 forged\r\nX-Forwarded-For: 192.0.2.66\r\n\r\n",
    )
    .await
    .expect("a response");
    assert_eq!(answer.status, 200);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(s.all("host"), ["app.example"]);
    assert_eq!(s.all("via"), ["1.1 sso-token-proxy"]);
    assert_eq!(s.all("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(s.all("x-forwarded-proto"), ["http"]);
    assert_eq!(s.all("x-forwarded-host"), ["app.example"]);
    assert_eq!(s.all("authorization"), ["Bearer token-1"]);
}

#[tokio::test]
async fn h2_connection_header_is_a_stream_protocol_error() {
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let mut h2 = RawH2::connect(proxy.addr).await;
    for (stream, name) in [
        (1, "connection"),
        (3, "keep-alive"),
        (5, "transfer-encoding"),
    ] {
        h2.get(stream, "/h2-hop", &[(name, "authorization")]).await;
        let end = h2
            .stream_end(stream)
            .await
            .expect("an answer on the stream");
        assert_eq!(end.kind, RST_STREAM, "{name}: {end:?}");
        assert_eq!(end.error_code(), PROTOCOL_ERROR, "{name}");
    }
    // A stream error, not a connection error: the next request is served,
    // with the token.
    h2.get(7, "/after", &[]).await;
    let head = h2.stream_head(7).await.expect("a response");
    assert_eq!(static_status(&head), Some(200));
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1, "only the well-formed request went upstream");
    assert_eq!(seen[0].uri, "/after");
    assert_eq!(seen[0].all("authorization"), ["Bearer token-1"]);
}

/// Trailer fields come after the body, where no header rule of the proxy
/// looks. They are not forwarded (as nginx does not): an `Authorization`
/// trailer would be a second credential beside the injected one, for an
/// upstream that merges trailers into its headers to find. h1 and h2
/// clients, a streamed body, an h2 upstream (whose client would pass
/// trailers on as they are) and an HTTP/1.1 one.
#[tokio::test]
async fn request_trailers_never_reach_the_upstream() {
    let (h2_upstream, ca_file) = Upstream::start_tls(&[b"h2"]).await;
    let mut config = proxy_config(&h2_upstream.https_url());
    config.upstream_ca_file = Some(ca_file.path().to_owned());
    let to_h2 = RunningProxy::start(config).await;
    let h1_upstream = Upstream::start().await;
    let to_h1 = RunningProxy::start(proxy_config(&h1_upstream.url())).await;

    let chunked = b"POST /trailed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
        Trailer: authorization, x-t\r\n\r\n5\r\nhello\r\n0\r\n\
        Authorization: Bearer from-a-trailer\r\nX-T: 1\r\n\r\n";
    for proxy in [&to_h2, &to_h1] {
        let answer = exchange(proxy.addr, chunked).await.expect("an answer");
        assert_eq!(answer.status, 200, "{answer:?}");
    }
    let mut h2 = RawH2::connect(to_h2.addr).await;
    let head = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "x"),
        (":path", "/trailed-h2"),
    ];
    h2.send(&frame(HEADERS, END_HEADERS, 1, &header_block(&head)))
        .await;
    h2.send(&frame(adversary::DATA, 0, 1, b"hello")).await;
    let trailers = [("authorization", "Bearer from-a-trailer"), ("x-t", "1")];
    h2.send(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &header_block(&trailers),
    ))
    .await;
    let answer = h2.stream_head(1).await.expect("an answer");
    assert_eq!(static_status(&answer), Some(200), "{answer:?}");

    let to_h2_seen = h2_upstream.seen();
    assert_eq!(to_h2_seen.len(), 2, "{to_h2_seen:?}");
    assert!(to_h2_seen.iter().all(|s| s.version == Version::HTTP_2));
    let to_h1_seen = h1_upstream.seen();
    assert_eq!(to_h1_seen.len(), 1, "{to_h1_seen:?}");
    for s in to_h2_seen.iter().chain(&to_h1_seen) {
        assert_eq!(s.body_len, 5, "{}", s.uri);
        assert_eq!(s.all("authorization"), ["Bearer token-1"], "{}", s.uri);
        assert!(s.trailers.is_empty(), "{}: {:?}", s.uri, s.trailers);
    }
}

// === 3. Request targets stay under the base path ===

/// Targets that climb above the base path, as HTTP/1 request targets.
const CLIMBING: [&str; 15] = [
    "/../internal",
    "/..",
    "/%2e%2e/internal",
    "/%2E%2E/internal",
    "/.%2e/internal",
    "/%2e./internal",
    "/a/../../internal",
    "/a/./b/../../../internal",
    "//..//internal",
    "/..%2Finternal",
    "/a%2F..%2F..%2Finternal",
    "/..%5cinternal",
    "/..\\internal",
    "/..;/internal",
    "/a/..%3b/..%3B/internal",
];

#[tokio::test]
async fn targets_climbing_above_the_base_path_are_refused() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with_base(&upstream).await;
    for target in CLIMBING {
        let answer = exchange(proxy.addr, &get(target, "Connection: close\r\n"))
            .await
            .expect("a response");
        assert_eq!(answer.status, 400, "{target}: {answer:?}");
        assert_eq!(answer.error(), "path_outside_base", "{target}");
        assert_eq!(answer.header("content-type"), Some("application/json"));
    }
    // Absolute form naming the proxy itself: the same check on its path.
    let absolute = format!("http://{}/../internal", proxy.addr);
    let answer = exchange(proxy.addr, &get(&absolute, "Connection: close\r\n"))
        .await
        .expect("a response");
    assert_eq!(answer.status, 400);
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
    assert_eq!(proxy.source.calls(), 0, "no token is sought for a refusal");
}

#[tokio::test]
async fn h2_paths_climbing_above_the_base_path_are_refused() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with_base(&upstream).await;
    let client = h2c_client();
    for target in CLIMBING {
        let request = Request::get(proxy.url(target)).body(empty()).unwrap();
        let (parts, body) = send(&client, request).await;
        assert_eq!(parts.status, StatusCode::BAD_REQUEST, "{target}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "path_outside_base", "{target}");
    }
    // `:path` as raw bytes, which no URL parser has seen first.
    let mut h2 = RawH2::connect(proxy.addr).await;
    h2.get(1, "/%2e%2e/%2e%2e/internal", &[]).await;
    let head = h2.stream_head(1).await.expect("a response");
    assert_eq!(static_status(&head), Some(400));
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
    assert_eq!(proxy.source.calls(), 0);
}

#[tokio::test]
async fn dot_segments_are_removed_and_the_query_kept_byte_for_byte() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with_base(&upstream).await;
    let client = h2c_client();
    for (target, forwarded) in [
        ("/a/./b/../c?q=/../%2e%2e&&x", "/api/a/c?q=/../%2e%2e&&x"),
        ("/a//b/%2e%2E/c/", "/api/a/c/"),
        ("/a/b/..", "/api/a/"),
        ("/a%2Fb/c", "/api/a%2Fb/c"),
        ("/..a/b..", "/api/..a/b.."),
    ] {
        let answer = exchange(proxy.addr, &get(target, "Connection: close\r\n"))
            .await
            .expect("a response");
        assert_eq!(answer.status, 200, "{target}");
        let request = Request::get(proxy.url(target)).body(empty()).unwrap();
        let (parts, _) = send(&client, request).await;
        assert_eq!(parts.status, StatusCode::OK, "{target}");
        let seen = upstream.seen();
        let last_two = &seen[seen.len() - 2..];
        for s in last_two {
            assert_eq!(s.uri, forwarded, "{target}");
            assert_eq!(s.all("authorization"), ["Bearer token-1"]);
        }
    }
}

#[tokio::test]
async fn escaped_slashes_can_be_refused_outright() {
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&format!("{}/api", upstream.url()));
    config.escaped_slashes = sso_token_proxy::proxy::EscapedSlashes::Reject;
    let proxy = RunningProxy::start(config).await;
    for target in ["/a%2Fb", "/a%2fb", "/a%5Cb", "/a\\b"] {
        let answer = exchange(proxy.addr, &get(target, "Connection: close\r\n"))
            .await
            .expect("a response");
        assert_eq!(answer.status, 400, "{target}");
        assert_eq!(answer.error(), "escaped_slash", "{target}");
    }
    assert!(upstream.seen().is_empty());
}

// === 8. Smuggling, target forms, floods ===

/// A GET with a chunked body (a search API's, say) reaches the upstream
/// with its body, framed, instead of as a GET without one; the connection
/// stays in step for the next request.
#[tokio::test]
async fn a_get_body_of_unknown_length_is_forwarded_not_dropped() {
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(
        b"GET /search HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(conn.response().await.expect("an answer").status, 200);
    conn.send(&get("/next", "")).await;
    assert_eq!(conn.response().await.expect("an answer").status, 200);
    // h2: DATA without `content-length`.
    let mut h2 = RawH2::connect(proxy.addr).await;
    let fields = get_fields("/h2-search", &[]);
    let mut bytes = frame(HEADERS, END_HEADERS, 1, &header_block(&fields));
    bytes.extend(frame(adversary::DATA, END_STREAM, 1, b"hello"));
    h2.send(&bytes).await;
    let (head, _) = h2.stream_response(1).await.expect("an answer");
    assert_eq!(static_status(&head), Some(200));
    let seen = upstream.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(
        (seen[0].method.as_str(), seen[0].uri.as_str()),
        ("GET", "/search")
    );
    assert_eq!(seen[0].body_len, 5, "{seen:?}");
    assert_eq!((seen[1].uri.as_str(), seen[1].body_len), ("/next", 0));
    assert_eq!((seen[2].uri.as_str(), seen[2].body_len), ("/h2-search", 5));
}

/// Requests a front end and a back end could frame differently. Each is
/// refused, or framed one way only: the upstream never sees a second,
/// smuggled request.
#[tokio::test]
async fn smuggling_attempts_never_reach_the_upstream_as_a_second_request() {
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let cases: Vec<(&str, String)> = vec![
        (
            "CL and TE",
            format!(
                "POST /front HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\
                 Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
                5 + smuggled.len()
            ),
        ),
        (
            "TE and CL",
            format!(
                "POST /front HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
                 Content-Length: 3\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "two Content-Lengths",
            format!(
                "POST /front HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\
                 Content-Length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
        ),
        (
            "Content-Length list",
            format!(
                "POST /front HTTP/1.1\r\nHost: x\r\nContent-Length: 0, {}\r\n\r\n{smuggled}",
                smuggled.len()
            ),
        ),
        (
            "chunked, identity",
            format!(
                "POST /front HTTP/1.1\r\nHost: x\r\n\
                 Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "obs-fold TE",
            format!(
                "POST /front HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\
                 Content-Length: 0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "space before colon",
            format!(
                "POST /front HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\
                 Content-Length: 0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "bare CR in a value",
            format!("GET /front HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n{smuggled}"),
        ),
        (
            "NUL in a value",
            format!("GET /front HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n{smuggled}"),
        ),
        (
            "HTTP/1.0 with TE",
            format!(
                "POST /front HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                 0\r\n\r\n{smuggled}"
            ),
        ),
    ];
    for (what, request) in &cases {
        let mut conn = RawConn::connect(proxy.addr).await;
        conn.send(request.as_bytes()).await;
        let first = conn.response().await;
        let second = conn.response().await;
        let first = first.unwrap_or_else(|| panic!("{what}: no response"));
        assert!(
            first.status == 400 || first.status == 200,
            "{what}: {first:?}"
        );
        assert!(second.is_none(), "{what}: a second response {second:?}");
    }
    let received = String::from_utf8_lossy(&upstream.received_bytes()).into_owned();
    assert!(!received.contains("smuggled"), "{received}");
    for s in upstream.seen() {
        assert_eq!(s.uri, "/front");
        assert!(
            s.header("transfer-encoding")
                .is_none_or(|te| te == "chunked")
        );
        assert_eq!(s.body_len, 0, "{s:?}");
    }
}

/// A chunked body whose trailer section breaks a line with a bare LF. A
/// front end that ends lines at LF reads what follows `0\r\n\n` as a
/// second request; a back end that took it for trailers would answer once
/// where the front end waits for two answers, and the next client's
/// request on that front-end connection would get the wrong response.
/// The proxy refuses such a body (`400`, the connection closed) instead of
/// answering it, and nothing after the last chunk reaches the upstream,
/// neither as a request nor as a trailer. hyper accepted these bytes as
/// trailers before 1.13, and the proxy answered `200`.
#[tokio::test]
async fn a_bare_lf_in_chunked_trailers_is_refused_not_answered() {
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let trailer_sections = [
        format!("\n{smuggled}"),
        format!("X-T: value\n\n{smuggled}"),
        format!("X-T: value\r\n\n{smuggled}"),
        "X-T: val\nue\r\n\r\n".to_owned(),
    ];
    for trailers in &trailer_sections {
        let request = format!(
            "POST /front HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n0\r\n{trailers}"
        );
        let mut conn = RawConn::connect(proxy.addr).await;
        conn.send(request.as_bytes()).await;
        let first = conn.response().await;
        let second = conn.response().await;
        let first = first.unwrap_or_else(|| panic!("{trailers:?}: no response"));
        assert_eq!(first.status, 400, "{trailers:?}: {first:?}");
        assert!(
            second.is_none(),
            "{trailers:?}: a second response {second:?}"
        );
    }
    let received = String::from_utf8_lossy(&upstream.received_bytes()).into_owned();
    assert!(!received.contains("smuggled"), "{received}");
    assert!(
        !received.contains("X-T") && !received.contains("x-t"),
        "{received}"
    );
    for s in upstream.seen() {
        assert_eq!(s.uri, "/front", "{s:?}");
        assert!(s.trailers.is_empty(), "{s:?}");
    }
}

/// A bare LF ends a line for the proxy's parser; what it forwards is
/// always re-framed with CRLF, so the upstream cannot read it differently.
#[tokio::test]
async fn bare_lf_lines_are_reframed_before_forwarding() {
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let answer = exchange(
        proxy.addr,
        b"GET /lf HTTP/1.1\nHost: x\nX-A: 1\nConnection: close\n\n",
    )
    .await;
    let received = upstream.received_bytes();
    match answer {
        Some(a) if a.status == 200 => {
            assert_eq!(upstream.seen().len(), 1);
            // Every line the upstream got ends in CRLF.
            for (i, &b) in received.iter().enumerate() {
                if b == b'\n' {
                    assert_eq!(
                        received[i - 1],
                        b'\r',
                        "{:?}",
                        String::from_utf8_lossy(&received)
                    );
                }
            }
        }
        other => {
            assert!(other.is_none_or(|a| a.status == 400));
            assert!(received.is_empty());
        }
    }
}

#[tokio::test]
async fn other_targets_and_tunnels_are_refused_and_never_forwarded() {
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    for (request, status, error) in [
        (
            "GET http://evil.example/x HTTP/1.1\r\nHost: evil.example\r\n\r\n",
            400,
            "foreign_target",
        ),
        (
            "GET https://evil.example:443/x HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
            "foreign_target",
        ),
        (
            "GET http://user@127.0.0.1/x HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
            "foreign_target",
        ),
        (
            "GET evil.example:443 HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
            "foreign_target",
        ),
        (
            "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
            405,
            "method_not_allowed",
        ),
        (
            "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            400,
            "unsupported_target",
        ),
    ] {
        let answer = exchange(proxy.addr, request.as_bytes())
            .await
            .expect("a response");
        assert_eq!(answer.status, status, "{request:?}: {answer:?}");
        assert_eq!(answer.error(), error, "{request:?}");
    }
    // h2 CONNECT, and a stream with a `:path` that is no path.
    let mut h2 = RawH2::connect(proxy.addr).await;
    let connect = [(":method", "CONNECT"), (":authority", "evil.example:443")];
    h2.send(&frame(HEADERS, END_HEADERS, 1, &header_block(&connect)))
        .await;
    let (_, body) = h2.stream_response(1).await.expect("an answer");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "method_not_allowed");
    let asterisk = [
        (":method", "OPTIONS"),
        (":scheme", "http"),
        (":authority", "x"),
        (":path", "*"),
    ];
    h2.send(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        3,
        &header_block(&asterisk),
    ))
    .await;
    let head = h2.stream_head(3).await.expect("an answer");
    assert!(
        head.kind == RST_STREAM || static_status(&head) == Some(400),
        "{head:?}"
    );
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
    assert_eq!(proxy.source.calls(), 0);
}

/// A `TRACE`'s final recipient answers with the request it received (RFC
/// 9110 §9.3.8; Apache does by default), so a forwarded `TRACE` would hand
/// the client the token the proxy injected. It is refused like `CONNECT`,
/// in every target form and over HTTP/2, before any token is sought.
#[tokio::test]
async fn trace_is_refused_so_no_upstream_can_echo_the_token() {
    // The harness upstream does echo: what a forwarded TRACE would return.
    let echoing = Upstream::start().await;
    let direct = exchange(
        echoing.addr,
        b"TRACE /x HTTP/1.1\r\nHost: up\r\nAuthorization: Bearer sent-directly\r\n\r\n",
    )
    .await
    .expect("an answer");
    assert_eq!(direct.status, 200);
    assert!(
        String::from_utf8_lossy(&direct.body).contains("Bearer sent-directly"),
        "{direct:?}"
    );

    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let absolute = format!("TRACE {}/x HTTP/1.1\r\nHost: x\r\n\r\n", upstream.url());
    for request in [
        "TRACE /x HTTP/1.1\r\nHost: x\r\n\r\n",
        "TRACE /x HTTP/1.1\r\nHost: x\r\nMax-Forwards: 5\r\nContent-Length: 2\r\n\r\nhi",
        "TRACE / HTTP/1.0\r\n\r\n",
        "trace /x HTTP/1.1\r\nHost: x\r\n\r\n",
        "TRACK /x HTTP/1.1\r\nHost: x\r\n\r\n",
        &absolute,
    ] {
        let answer = exchange(proxy.addr, request.as_bytes())
            .await
            .expect("an answer");
        assert_eq!(answer.status, 405, "{request:?}: {answer:?}");
        assert_eq!(answer.error(), "method_not_allowed", "{request:?}");
        let allow = answer.header("allow").expect("an Allow field");
        assert!(allow.contains("GET") && !allow.contains("TRACE"), "{allow}");
        assert!(
            !String::from_utf8_lossy(&answer.body).contains("token-1"),
            "{answer:?}"
        );
    }
    let mut h2 = RawH2::connect(proxy.addr).await;
    let trace = [
        (":method", "TRACE"),
        (":scheme", "http"),
        (":authority", "x"),
        (":path", "/x"),
    ];
    h2.send(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &header_block(&trace),
    ))
    .await;
    let (_, body) = h2.stream_response(1).await.expect("an answer");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "method_not_allowed");
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
    assert_eq!(proxy.source.calls(), 0);
    // The proxy still forwards, with the token, what it may.
    let answer = exchange(proxy.addr, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("an answer");
    assert_eq!(answer.status, 200);
    assert_eq!(upstream.seen()[0].all("authorization"), ["Bearer token-1"]);
}

/// `max_request_header_bytes` holds however the head arrives: hyper
/// checks its buffer limit only while a head is incomplete, so a head
/// that arrives whole in one read could pass it by up to about twice.
#[tokio::test]
async fn a_head_over_the_limit_is_431_even_when_it_arrives_in_one_piece() {
    const LIMIT: usize = 64 * 1024;
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.max_request_header_bytes = LIMIT;
    let proxy = RunningProxy::start(config).await;
    for (path, field) in [("/under", LIMIT - 1024), ("/over", LIMIT + 16 * 1024)] {
        let head = get(
            path,
            &format!("X-Big: {}\r\nConnection: close\r\n", "b".repeat(field)),
        );
        let mut conn = RawConn::connect(proxy.addr).await;
        let _ = conn.try_send(&head).await;
        let answer = conn.response().await;
        if path == "/under" {
            assert_eq!(answer.expect("an answer").status, 200, "{path}");
        } else {
            assert!(answer.is_none_or(|a| a.status == 431), "{path}");
        }
    }
    let uris: Vec<String> = upstream.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(uris, ["/under"]);
}

#[tokio::test]
async fn header_and_uri_floods_are_refused_before_the_upstream() {
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    // Many fields.
    let many: String = (0..500).map(|i| format!("X-F-{i}: {i}\r\n")).collect();
    let answer = exchange(proxy.addr, &get("/many", &many)).await;
    assert!(answer.is_none_or(|a| a.status == 431), "many fields");
    // One huge field.
    let huge = format!("X-Huge: {}\r\n", "a".repeat(1024 * 1024));
    let mut conn = RawConn::connect(proxy.addr).await;
    // The proxy may close before all of it is written.
    let _ = conn.try_send(&get("/huge", &huge)).await;
    let answer = conn.response().await;
    assert!(answer.is_none_or(|a| a.status == 431), "huge field");
    // A huge target.
    let target = format!("/{}", "u".repeat(100 * 1024));
    let mut conn = RawConn::connect(proxy.addr).await;
    let _ = conn.try_send(&get(&target, "")).await;
    let answer = conn.response().await;
    assert!(
        answer.is_none_or(|a| a.status == 414 || a.status == 431),
        "huge target"
    );
    // h2: a header list over the limit.
    let mut h2 = RawH2::connect(proxy.addr).await;
    let big = "b".repeat(200 * 1024);
    let fields = get_fields("/h2-huge", &[("x-big", &big)]);
    let block = header_block(&fields);
    // In frames of at most 16 KiB: HEADERS, then CONTINUATIONs.
    let mut chunks = block.chunks(16 * 1024).peekable();
    let first = chunks.next().unwrap();
    let mut bytes = frame(HEADERS, END_STREAM, 1, first);
    while let Some(chunk) = chunks.next() {
        let flags = if chunks.peek().is_none() {
            END_HEADERS
        } else {
            0
        };
        bytes.extend(frame(9, flags, 1, chunk));
    }
    let _ = h2.try_send(&bytes).await;
    let end = h2.stream_end(1).await;
    assert!(
        end.as_ref()
            .is_none_or(|f| f.kind != HEADERS || static_status(f) != Some(200)),
        "{end:?}"
    );
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen().len());
    assert_eq!(proxy.source.calls(), 0);
}

#[tokio::test]
async fn a_proxy_answers_new_clients_after_each_attack() {
    // The attacks above leave the proxy serving: one plain request after a
    // burst of each kind, on a fresh connection.
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    for bad in [
        &b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"[..],
        b"\x00\x01\x02garbage\r\n\r\n",
        b"GET /x HTTP/9.9\r\n\r\n",
    ] {
        let _ = exchange(proxy.addr, bad).await;
    }
    let answer = exchange(proxy.addr, &get("/fine", "Connection: close\r\n"))
        .await
        .expect("a response");
    assert_eq!(answer.status, 200);
    assert_eq!(upstream.seen().len(), 1);
    assert_eq!(upstream.seen()[0].uri, "/fine");
}

// === 4. Every state of a connection has a timer; connections are capped ===

/// Reads until the proxy closes `stream`; how long that took from `since`,
/// or `None` if it stayed open for the whole guard.
async fn closed_after(mut stream: TcpStream, since: Instant) -> Option<Duration> {
    adversary::wait_eof(&mut stream, adversary::GUARD)
        .await
        .then(|| since.elapsed())
}

/// Sends plain requests on fresh connections until told to stop; each must
/// be answered 200. Returns how many were.
fn probe_until(addr: std::net::SocketAddr, mut stop: watch::Receiver<bool>) -> JoinHandle<usize> {
    tokio::spawn(async move {
        let mut served = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = stop.changed() => return served,
                _ = tick.tick() => {
                    let answer = exchange(addr, &get("/probe", "Connection: close\r\n"))
                        .await
                        .expect("a new client is answered");
                    assert_eq!(answer.status, 200, "{answer:?}");
                    served += 1;
                }
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_of_every_kind_are_closed_while_new_clients_are_served() {
    const EACH: usize = 100;
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    // Long enough that a probe's head is always read in time on a busy
    // machine; the stalled connections must wait it out.
    config.header_read_timeout = Duration::from_secs(2);
    config.request_body_timeout = Duration::from_secs(2);
    // The h2 clients are sent GOAWAY, and closed this long after.
    config.drain_timeout = Duration::from_secs(1);
    // Far longer than the test: only the timers under test may close.
    config.idle_timeout = Duration::from_secs(60);
    let proxy = RunningProxy::start(config).await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let prober = probe_until(proxy.addr, stop_rx);

    let start = Instant::now();
    let mut stalled: Vec<(&str, TcpStream)> = Vec::new();
    for _ in 0..EACH {
        // Nothing at all.
        stalled.push(("no bytes", TcpStream::connect(proxy.addr).await.unwrap()));
        // Half a request head.
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-A:")
            .await
            .unwrap();
        stalled.push(("partial head", s));
        // A head, then three of ten body bytes.
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            .await
            .unwrap();
        stalled.push(("partial body", s));
        // The h2 preface and SETTINGS, then nothing.
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        let mut hello = adversary::PREFACE.to_vec();
        hello.extend(frame(adversary::SETTINGS, 0, 0, &[]));
        s.write_all(&hello).await.unwrap();
        stalled.push(("h2 preface", s));
    }
    let sent = Instant::now();
    let waits: Vec<_> = stalled
        .into_iter()
        .map(|(kind, s)| tokio::spawn(async move { (kind, closed_after(s, sent).await) }))
        .collect();
    for wait in waits {
        let (kind, closed) = wait.await.unwrap();
        let closed =
            closed.unwrap_or_else(|| panic!("{kind}: still open after {:?}", adversary::GUARD));
        // Not before its timer, which started after `start`.
        assert!(
            closed + (sent - start) >= Duration::from_secs(2),
            "{kind}: closed after {closed:?}"
        );
    }
    let _ = stop_tx.send(true);
    let served = prober.await.unwrap();
    assert!(served >= 5, "only {served} probes were served");
    // Only the probes reached the upstream.
    let seen = upstream.seen();
    assert_eq!(seen.len(), served);
    assert!(seen.iter().all(|s| s.uri == "/probe"));
}

/// How many request heads of `method` the upstream has received so far.
fn heads_received(upstream: &Upstream, method: &str) -> usize {
    let received = String::from_utf8_lossy(&upstream.received_bytes()).into_owned();
    received.matches(&format!("{method} /")).count()
}

/// Bodies held in memory for a replay share one budget over all
/// connections (and h2 streams): a body that finds no room is streamed to
/// the upstream at once instead of being held, so stalled bodies cannot
/// make the proxy hold more than `replay_buffer_bytes`.
#[tokio::test]
async fn bodies_held_for_a_replay_share_one_budget() {
    const BODY: usize = 60 * 1024;
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    // Room for one body of 60 KiB, not two.
    config.replay_buffer_bytes = 100 * 1024;
    let proxy = RunningProxy::start(config).await;
    for round in 0..2 {
        let before = heads_received(&upstream, "POST");
        let mut stalled = Vec::new();
        for i in 0..3 {
            let mut conn = RawConn::connect(proxy.addr).await;
            conn.send(
                format!("POST /r{round}-{i} HTTP/1.1\r\nHost: x\r\nContent-Length: {BODY}\r\n\r\n")
                    .as_bytes(),
            )
            .await;
            conn.send(&vec![b'a'; BODY - 1]).await;
            stalled.push(conn);
        }
        // One body is held (it cannot reach the upstream before its last
        // byte); the two without room go upstream while still incomplete.
        let deadline = Instant::now() + adversary::GUARD;
        while heads_received(&upstream, "POST") < before + 2 {
            assert!(
                Instant::now() < deadline,
                "round {round}: no body was streamed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            heads_received(&upstream, "POST"),
            before + 2,
            "round {round}: the held body went upstream before it was complete"
        );
        for conn in &mut stalled {
            conn.send(b"a").await;
        }
        for mut conn in stalled {
            assert_eq!(conn.response().await.expect("an answer").status, 200);
        }
        // The held body's room came back: the next round holds one again.
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 6);
    assert!(seen.iter().all(|s| s.body_len == BODY as u64), "{seen:?}");
}

/// A kept-alive HTTP/1 connection owes its next head within
/// `header_read_timeout` of the end of its last request, whether it sends
/// nothing or part of a head; the clock starts again with each request.
#[tokio::test]
async fn a_later_http1_head_is_due_within_the_header_timeout_of_the_last_answer() {
    const HEAD: Duration = Duration::from_millis(600);
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.header_read_timeout = HEAD;
    // Far longer than the test: only the header timer may close.
    config.idle_timeout = Duration::from_secs(60);
    let proxy = RunningProxy::start(config).await;
    for later in [&b""[..], b"GET /never HTTP/1.1\r\nHost: x\r\nX-A:"] {
        let mut conn = RawConn::connect(proxy.addr).await;
        conn.send(&get("/first", "")).await;
        assert_eq!(conn.response().await.expect("an answer").status, 200);
        // Two thirds of the timer, then a second request on the same
        // connection: its end, not the first one's, starts the clock.
        tokio::time::sleep(HEAD * 2 / 3).await;
        // The clock starts when the second request ends, after it was sent
        // and before its answer arrives here: measured from the sending,
        // less the millisecond the proxy rounds that instant down by.
        let sent = Instant::now();
        conn.send(&get("/second", "")).await;
        assert_eq!(conn.response().await.expect("an answer").status, 200);
        conn.send(later).await;
        let closed = closed_after(conn.into_stream(), sent)
            .await
            .unwrap_or_else(|| panic!("{later:?}: still open after {:?}", adversary::GUARD));
        assert!(
            closed + Duration::from_millis(2) >= HEAD,
            "{later:?}: closed {closed:?} after the second request"
        );
    }
    let uris: Vec<String> = upstream.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(uris, ["/first", "/second", "/first", "/second"]);
}

#[tokio::test]
async fn a_buffered_body_that_stops_gets_408_and_the_connection_is_closed() {
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.request_body_timeout = Duration::from_millis(500);
    let proxy = RunningProxy::start(config).await;
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        .await;
    let answer = conn.response().await.expect("an answer");
    assert_eq!(answer.status, 408);
    assert_eq!(answer.error(), "request_body_timeout");
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(conn.closed_within(adversary::GUARD).await);
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn a_streamed_body_that_stops_gets_408_and_the_upstream_request_is_aborted() {
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.request_body_timeout = Duration::from_millis(500);
    let proxy = RunningProxy::start(config).await;
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n",
    )
    .await;
    let answer = conn.response().await.expect("an answer");
    assert_eq!(answer.status, 408, "{answer:?}");
    assert_eq!(answer.error(), "request_body_timeout");
    assert!(conn.closed_within(adversary::GUARD).await);
    // The upstream got the head and the five bytes, then the connection
    // was cut: it never saw a complete body.
    upstream.wait_ended(1).await;
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body_len, 5);
    assert_eq!(seen[0].all("authorization"), ["Bearer token-1"]);
}

#[tokio::test]
async fn an_h2_body_that_stops_gets_408_on_its_stream() {
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.request_body_timeout = Duration::from_millis(500);
    let proxy = RunningProxy::start(config).await;
    let mut h2 = RawH2::connect(proxy.addr).await;
    let fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "x"),
        (":path", "/upload"),
        ("content-length", "10"),
    ];
    h2.send(&frame(HEADERS, END_HEADERS, 1, &header_block(&fields)))
        .await;
    h2.send(&frame(adversary::DATA, 0, 1, b"abc")).await;
    let (head, body) = h2.stream_response(1).await.expect("an answer");
    assert_eq!(head.kind, HEADERS);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"], "request_body_timeout");
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn malformed_request_bodies_are_the_clients_fault() {
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    // Streamed (chunked) and buffered (Content-Length) bodies that break.
    for (what, request) in [
        (
            "bad chunk size",
            &b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"[..],
        ),
        (
            "chunk longer than declared",
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n",
        ),
    ] {
        let answer = exchange(proxy.addr, request).await.expect("an answer");
        assert_eq!(answer.status, 400, "{what}: {answer:?}");
        assert_eq!(answer.error(), "bad_request_body", "{what}");
    }
    // A body shorter than its Content-Length, then the client half-closes.
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        .await;
    let mut stream = conn.into_stream();
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(adversary::GUARD, stream.read_to_end(&mut rest)).await;
    let text = String::from_utf8_lossy(&rest);
    assert!(
        rest.is_empty() || text.starts_with("HTTP/1.1 400"),
        "{text}"
    );
    // Nothing complete reached the upstream.
    for s in upstream.seen() {
        assert!(s.body_len < 10, "{s:?}");
    }
}

/// A client that sends its request and at once closes its side for
/// writing (`shutdown(SHUT_WR)`, as `nc -N` does) still gets its answer,
/// and the upstream sees the request once. hyper's default would read
/// ahead while the request is in flight, take the end of the stream for
/// an abort and drop the request.
#[tokio::test]
async fn a_client_that_half_closes_after_its_request_gets_the_answer() {
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(b"GET /held HTTP/1.1\r\nHost: x\r\nx-test-hold: 1\r\n\r\n")
        .await;
    let mut stream = conn.into_stream();
    stream.shutdown().await.unwrap();
    let arrived = tokio::time::timeout(adversary::GUARD, upstream.wait_arrived())
        .await
        .expect("the request reaches the upstream after the client's FIN");
    assert_eq!(arrived, "/held");
    upstream.release();
    let mut answer = Vec::new();
    tokio::time::timeout(adversary::GUARD, stream.read_to_end(&mut answer))
        .await
        .expect("the proxy answers and closes")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0]
            .header("authorization")
            .is_some_and(|v| v.starts_with("Bearer ")),
        "{seen:?}"
    );
}

/// A client that goes away while its request is in flight: the request
/// runs to the upstream's answer (bounded by the upstream response timer),
/// the answer is dropped, and the connection's place under
/// `max_connections` comes free for the next client.
#[tokio::test]
async fn a_client_gone_mid_request_frees_its_place_once_the_upstream_answers() {
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.max_connections = 1;
    let proxy = RunningProxy::start(config).await;
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(b"GET /gone HTTP/1.1\r\nHost: x\r\nx-test-hold: 1\r\n\r\n")
        .await;
    assert_eq!(upstream.wait_arrived().await, "/gone");
    drop(conn);
    let next = tokio::spawn({
        let addr = proxy.addr;
        async move { exchange(addr, &get("/next", "Connection: close\r\n")).await }
    });
    upstream.release();
    let answer = tokio::time::timeout(adversary::GUARD, next)
        .await
        .expect("the place comes free")
        .unwrap()
        .expect("an answer");
    assert_eq!(answer.status, 200);
    let uris: Vec<String> = upstream.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(uris, ["/gone", "/next"]);
}

#[tokio::test]
async fn the_upstream_response_timer_starts_once_the_body_is_sent() {
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.upstream_response_timeout = Duration::from_millis(1500);
    config.request_body_timeout = Duration::from_secs(5);
    let proxy = RunningProxy::start(config).await;
    let mut conn = RawConn::connect(proxy.addr).await;
    conn.send(b"POST /slow-upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    // An upload that takes three times the response timeout, at a pace
    // well inside the body timeout.
    for _ in 0..15 {
        conn.send(b"4\r\ndata\r\n").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    conn.send(b"0\r\n\r\n").await;
    let answer = conn.response().await.expect("an answer");
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body_len, 60);
}

#[tokio::test]
async fn large_upstream_response_heads_pass() {
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let answer = exchange(
        proxy.addr,
        &get(
            "/many",
            "X-Test-Response-Headers: 250\r\nX-Test-Response-Header-Bytes: 65536\r\nConnection: close\r\n",
        ),
    )
    .await
    .expect("an answer");
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.header("x-h-249"), Some("249"));
    assert_eq!(answer.header("x-big").map(str::len), Some(65536));
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn upstream_connections_are_capped_and_requests_wait_then_get_503() {
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.upstream_max_connections = 2;
    config.upstream_queue_timeout = Duration::from_millis(500);
    let proxy = RunningProxy::start(config).await;
    let held: Vec<_> = (0..2)
        .map(|i| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                exchange(addr, &get(&format!("/held/{i}"), "X-Test-Hold: 1\r\n")).await
            })
        })
        .collect();
    upstream.wait_arrived().await;
    upstream.wait_arrived().await;
    // Both connections busy: a third request waits, then is refused.
    let answer = exchange(proxy.addr, &get("/third", "Connection: close\r\n"))
        .await
        .expect("an answer");
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(answer.error(), "upstream_saturated");
    assert_eq!(answer.header("retry-after"), Some("1"));
    assert_eq!(upstream.connections(), 2);
    // A request that waits while one comes free gets that connection.
    let waiting = tokio::spawn({
        let addr = proxy.addr;
        async move { exchange(addr, &get("/fourth", "Connection: close\r\n")).await }
    });
    upstream.release();
    for h in held {
        assert_eq!(h.await.unwrap().expect("an answer").status, 200);
    }
    assert_eq!(waiting.await.unwrap().expect("an answer").status, 200);
    assert_eq!(upstream.connections(), 2, "never more than the cap");
    let uris: Vec<String> = upstream.seen().into_iter().map(|s| s.uri).collect();
    assert!(!uris.contains(&"/third".to_owned()), "{uris:?}");
    assert!(uris.contains(&"/fourth".to_owned()), "{uris:?}");
}

#[tokio::test]
async fn client_connections_are_capped_and_new_clients_wait_for_a_free_slot() {
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.max_connections = 5;
    config.header_read_timeout = Duration::from_millis(800);
    let proxy = RunningProxy::start(config).await;
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    // The sixth gets through the kernel's backlog but is served only once
    // one of the five has been closed by its header timer.
    let start = Instant::now();
    let sixth = tokio::spawn({
        let addr = proxy.addr;
        async move {
            let answer = exchange(addr, &get("/sixth", "Connection: close\r\n")).await;
            (answer, Instant::now())
        }
    });
    let mut first_closed = None;
    for s in idle {
        let after = closed_after(s, start).await.expect("closed by its timer");
        first_closed = Some(first_closed.map_or(after, |f: Duration| f.min(after)));
    }
    let (answer, answered) = sixth.await.unwrap();
    assert_eq!(answer.expect("an answer").status, 200);
    assert!(
        answered.duration_since(start) >= first_closed.unwrap(),
        "the sixth client was served before a slot was free"
    );
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn an_idle_h2_connection_gets_goaway_and_is_closed_after_the_drain_timeout() {
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.idle_timeout = Duration::from_millis(500);
    config.drain_timeout = Duration::from_millis(500);
    let proxy = RunningProxy::start(config).await;
    let mut h2 = RawH2::connect(proxy.addr).await;
    h2.get(1, "/once", &[]).await;
    let (head, _) = h2.stream_response(1).await.expect("an answer");
    assert_eq!(static_status(&head), Some(200));
    let answered = Instant::now();
    // Idle: GOAWAY (with a PING this client never answers), then the socket
    // is closed rather than left waiting for the client.
    let goaway = h2.goaway().await.expect("a GOAWAY");
    assert_eq!(goaway.error_code(), 0);
    // On the idle timer, not on the header timer (10 s) that runs first
    // on a new connection.
    let idle_for = answered.elapsed();
    assert!(
        idle_for < Duration::from_secs(5),
        "GOAWAY after {idle_for:?}"
    );
    assert!(h2.closed_within(adversary::GUARD).await, "socket left open");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/once");
    assert_eq!(proxy.source.calls(), 1);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_after_the_send_timeout() {
    const SIZE: usize = 32 * 1024 * 1024;
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.send_timeout = Duration::from_millis(500);
    // The first timer of a new connection; the send timer must not wait
    // for it.
    config.header_read_timeout = Duration::from_secs(20);
    let proxy = RunningProxy::start(config).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(proxy.addr).await.unwrap();
    stream
        .write_all(&get("/big", &format!("X-Test-Response-Bytes: {SIZE}\r\n")))
        .await
        .unwrap();
    // The client reads nothing. Once the proxy gives up on it, it drops
    // the response and with it the upstream connection.
    let asked = Instant::now();
    upstream.wait_ended(1).await;
    let stopped = asked.elapsed();
    assert!(
        stopped < Duration::from_secs(10),
        "closed after {stopped:?}, not on the send timer"
    );
    let mut received = Vec::new();
    let _ = tokio::time::timeout(adversary::GUARD, stream.read_to_end(&mut received)).await;
    assert!(received.len() < SIZE, "the whole response was delivered");
}

// === 6. HTTP/2 abuse ===

/// A proxy whose HTTP/2 clients may send 100 control frames a second.
async fn proxy_with_frame_budget(upstream: &Upstream) -> RunningProxy {
    let mut config = proxy_config(&upstream.url());
    config.http2_max_control_frames_per_second = 100;
    RunningProxy::start(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_frame_floods_get_goaway_enhance_your_calm_and_are_closed() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with_frame_budget(&upstream).await;
    let open_post = frame(
        HEADERS,
        END_HEADERS,
        1,
        &header_block(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "x"),
            (":path", "/flood"),
        ]),
    );
    let floods: [(&str, Vec<u8>, Vec<u8>); 7] = [
        ("PING", vec![], frame(adversary::PING, 0, 0, &[7; 8])),
        ("SETTINGS", vec![], frame(adversary::SETTINGS, 0, 0, &[])),
        (
            "SETTINGS with a value",
            vec![],
            frame(adversary::SETTINGS, 0, 0, &[0, 4, 0, 1, 0, 0]),
        ),
        (
            "PRIORITY",
            vec![],
            frame(adversary::PRIORITY, 0, 3, &[0, 0, 0, 0, 16]),
        ),
        (
            "WINDOW_UPDATE",
            vec![],
            frame(adversary::WINDOW_UPDATE, 0, 0, &[0, 0, 0, 1]),
        ),
        ("empty DATA", open_post, frame(adversary::DATA, 0, 1, &[])),
        ("unknown type", vec![], frame(0xee, 0, 0, &[])),
    ];
    let client = h2c_client();
    for (what, setup, unit) in floods {
        let (goaway, closed) = adversary::flood(proxy.addr, &setup, &unit).await;
        let goaway = goaway.unwrap_or_else(|| panic!("{what}: no GOAWAY"));
        assert_eq!(
            goaway.error_code(),
            adversary::ENHANCE_YOUR_CALM,
            "{what}: {goaway:?}"
        );
        assert!(closed, "{what}: the connection stayed open");
        // Others are served all the while.
        let request = Request::get(proxy.url("/after-flood"))
            .body(empty())
            .unwrap();
        let (parts, _) = send(&client, request).await;
        assert_eq!(parts.status, StatusCode::OK, "{what}");
    }
    assert!(
        upstream
            .seen()
            .iter()
            .all(|s| s.uri != "/flood" || s.body_len == 0),
        "nothing but empty bodies came of the floods"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_is_cut_off() {
    let upstream = Upstream::start().await;
    let proxy = proxy_with_frame_budget(&upstream).await;
    // Open a stream and cancel it at once, over and over (CVE-2023-44487).
    let mut unit = Vec::new();
    for i in 0..500u32 {
        let id = 2 * i + 1;
        let fields = get_fields("/reset", &[]);
        unit.extend(frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            id,
            &header_block(&fields),
        ));
        unit.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    let (goaway, closed) =
        adversary::flood(proxy.addr, &unit, &frame(adversary::PING, 0, 0, &[1; 8])).await;
    let goaway = goaway.expect("a GOAWAY");
    assert_eq!(
        goaway.error_code(),
        adversary::ENHANCE_YOUR_CALM,
        "{goaway:?}"
    );
    assert!(closed);
    let reached = upstream.seen().len();
    assert!(
        reached <= 200,
        "{reached} of 500 cancelled requests reached the upstream"
    );
}

#[tokio::test]
async fn concurrent_streams_beyond_the_limit_are_refused() {
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.http2_max_concurrent_streams = 4;
    let proxy = RunningProxy::start(config).await;
    let mut h2 = RawH2::connect(proxy.addr).await;
    // Take in the server's SETTINGS (and its limit) first.
    h2.get(1, "/first", &[]).await;
    let (head, _) = h2.stream_response(1).await.expect("an answer");
    assert_eq!(static_status(&head), Some(200));
    for i in 0..6u32 {
        h2.get(3 + 2 * i, "/held", &[("x-test-hold", "1")]).await;
    }
    for _ in 0..4 {
        upstream.wait_arrived().await;
    }
    let mut refused = 0;
    while refused < 2 {
        let f = h2.frame().await.expect("frames until two refusals");
        if f.kind == RST_STREAM {
            assert_eq!(f.error_code(), 7, "REFUSED_STREAM: {f:?}");
            refused += 1;
        }
    }
    upstream.release();
    assert_eq!(upstream.seen().len(), 5, "the first and four held");
}

/// An HTTP/2 client that opens no flow-control window (its
/// `SETTINGS_INITIAL_WINDOW_SIZE` is 0) gets response heads but no body
/// bytes, and its socket never fills: only a timer per stream can tell
/// that it takes nothing. Without one, each such stream held an upstream
/// connection for as long as the client kept its connection, and a few
/// streams took every place under `upstream_max_connections`.
#[tokio::test]
async fn an_h2_stream_whose_client_opens_no_window_is_reset_after_the_send_timeout() {
    const SIZE: usize = 32 * 1024 * 1024;
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.send_timeout = Duration::from_millis(500);
    config.upstream_max_connections = 2;
    config.upstream_queue_timeout = Duration::from_secs(3);
    // Neither the idle nor the first-head timer may be what ends it.
    config.header_read_timeout = Duration::from_secs(20);
    config.idle_timeout = Duration::from_secs(20);
    let proxy = RunningProxy::start(config).await;
    let mut h2 = RawH2::connect_without_window(proxy.addr).await;
    let size = SIZE.to_string();
    for stream in [1, 3] {
        h2.get(stream, "/big", &[("x-test-response-bytes", &size)])
            .await;
    }
    let asked = Instant::now();
    for stream in [1, 3] {
        let head = h2.stream_head(stream).await.expect("a response head");
        assert_eq!(head.kind, HEADERS, "{head:?}");
        assert_eq!(static_status(&head), Some(200));
    }
    // Each stream is reset once it has taken nothing for the send
    // timeout, and its upstream connection is dropped with it.
    let mut reset = Vec::new();
    while reset.len() < 2 {
        let f = h2.frame().await.expect("frames until both resets");
        assert_ne!(
            f.kind,
            adversary::GOAWAY,
            "the connection was closed: {f:?}"
        );
        assert_ne!(
            f.kind,
            adversary::DATA,
            "body bytes without a window: {f:?}"
        );
        if f.kind == RST_STREAM {
            assert_eq!(f.error_code(), adversary::CANCEL, "{f:?}");
            reset.push(f.stream);
        }
    }
    reset.sort_unstable();
    assert_eq!(reset, [1, 3]);
    upstream.wait_ended(2).await;
    let stopped = asked.elapsed();
    assert!(
        stopped < Duration::from_secs(10),
        "reset after {stopped:?}, not on the send timer"
    );
    // The places under the cap are free again: another client is served
    // at once, not after the queue timeout with a 503.
    let answer = exchange(proxy.addr, &get("/after", "Connection: close\r\n"))
        .await
        .expect("an answer");
    assert_eq!(answer.status, 200, "{answer:?}");
    // Only the streams were reset: the connection serves a stream whose
    // window the client opens.
    h2.get(5, "/small", &[]).await;
    h2.send(&frame(
        adversary::WINDOW_UPDATE,
        0,
        5,
        &1000u32.to_be_bytes(),
    ))
    .await;
    let (head, body) = h2.stream_response(5).await.expect("an answer");
    assert_eq!(static_status(&head), Some(200));
    assert_eq!(body, b"ok");
    let uris: Vec<String> = upstream.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(uris, ["/big", "/big", "/after", "/small"]);
    assert_eq!(proxy.source.calls(), 1);
}

/// With an HTTP/2 upstream every request shares one upstream connection
/// and its flow-control window (hyper's client: 5 MiB for the connection,
/// 2 MiB a stream). What a stalled client stream does not take stays in
/// that window, so three such streams shut it for every other client's
/// response body. The stream send timer bounds that to `send_timeout`:
/// the stalled streams are reset, their unread data given back, and the
/// other client's answer arrives whole.
#[tokio::test]
async fn stalled_h2_clients_hold_an_h2_upstreams_window_only_until_their_send_timer() {
    const BIG: usize = 32 * 1024 * 1024;
    const MEDIUM: usize = 1024 * 1024;
    let (upstream, ca_file) = Upstream::start_tls(&[b"h2"]).await;
    let mut config = proxy_config(&upstream.https_url());
    config.upstream_ca_file = Some(ca_file.path().to_owned());
    config.send_timeout = Duration::from_secs(2);
    config.header_read_timeout = Duration::from_secs(20);
    config.idle_timeout = Duration::from_secs(20);
    let proxy = RunningProxy::start(config).await;
    // Once a first answer has come over h2, every request shares that
    // connection.
    let first = exchange(proxy.addr, &get("/first", "Connection: close\r\n"))
        .await
        .expect("an answer");
    assert_eq!(first.status, 200, "{first:?}");
    let mut stalled = RawH2::connect_without_window(proxy.addr).await;
    let size = BIG.to_string();
    let streams = [1, 3, 5, 7];
    for stream in streams {
        stalled
            .get(stream, "/big", &[("x-test-response-bytes", &size)])
            .await;
    }
    for stream in streams {
        let head = stalled.stream_head(stream).await.expect("a response head");
        assert_eq!(static_status(&head), Some(200), "{head:?}");
    }
    let asked = Instant::now();
    let answer = exchange(
        proxy.addr,
        &get(
            "/medium",
            &format!("X-Test-Response-Bytes: {MEDIUM}\r\nConnection: close\r\n"),
        ),
    )
    .await
    .expect("an answer");
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body.len(), MEDIUM);
    assert!(
        answer
            .body
            .iter()
            .enumerate()
            .all(|(i, &b)| b == harness::pattern_byte(i)),
        "the body arrived altered"
    );
    let waited = asked.elapsed();
    assert!(
        waited < Duration::from_secs(15),
        "answered after {waited:?}, not once the stalled streams were reset"
    );
    let mut reset = 0;
    while reset < streams.len() {
        let f = stalled.frame().await.expect("frames until the resets");
        if f.kind == RST_STREAM {
            assert_eq!(f.error_code(), adversary::CANCEL, "{f:?}");
            reset += 1;
        }
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 6, "{seen:?}");
    assert_eq!(upstream.connections(), 1, "one shared upstream connection");
    assert!(seen.iter().all(|s| s.version == Version::HTTP_2));
    assert!(
        seen.iter()
            .all(|s| s.all("authorization") == ["Bearer token-1"])
    );
}
