//! The reverse proxy over real sockets: an in-process `Proxy` on
//! 127.0.0.1:0, a recording hyper upstream, HTTP/1.1, h2c and raw clients.
//!
//! Run with `cargo test --test proxy`.

#[path = "support/proxy_harness.rs"]
#[allow(dead_code)] // Shared with tests/adversarial.rs, which uses other parts.
mod harness;

use std::{
    io::ErrorKind,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures_util::FutureExt as _;
use harness::{
    HANG_GUARD, RunningProxy, Upstream, answered_ok, chunked_pattern, empty, full, h1_client,
    h2c_client, hex, pattern_sha256, proxy_config, raw, send,
};
use http::{Method, Request, StatusCode, Version};
use sha2::{Digest as _, Sha256};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

fn get(url: &str) -> http::request::Builder {
    Request::get(url)
}

#[tokio::test]
async fn injects_the_token_and_replaces_the_clients_authorization() {
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let client = h1_client();

    let (parts, body) = send(&client, get(&proxy.url("/a")).body(empty()).unwrap()).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body, "ok");
    let request = get(&proxy.url("/b"))
        .header("authorization", "Bearer the-clients-own")
        .header("authorization", "Basic dXNlcjpwYXNz")
        .body(empty())
        .unwrap();
    let (parts, _) = send(&client, request).await;
    assert_eq!(parts.status, StatusCode::OK);

    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.all("authorization"), ["Bearer token-1"]);
    }
    assert_eq!(proxy.source.calls(), 1, "one token serves both requests");
}

#[tokio::test]
async fn path_and_query_are_kept_and_the_base_path_is_joined() {
    let upstream = Upstream::start().await;
    let client = h1_client();
    let target = "/a/b%20c/?x=1&y=%2F%3f&empty=&&z=a+b#";
    let target = target.trim_end_matches('#');

    let plain = RunningProxy::start(proxy_config(&upstream.url())).await;
    send(&client, get(&plain.url(target)).body(empty()).unwrap()).await;
    let based = RunningProxy::start(proxy_config(&format!("{}/base/v1/", upstream.url()))).await;
    send(&client, get(&based.url(target)).body(empty()).unwrap()).await;
    send(&client, get(&based.url("/")).body(empty()).unwrap()).await;

    let seen = upstream.seen();
    assert_eq!(seen[0].uri, target);
    assert_eq!(seen[1].uri, format!("/base/v1{target}"));
    assert_eq!(seen[2].uri, "/base/v1/");
}

#[tokio::test]
async fn host_is_the_upstreams_unless_preserve_host() {
    let upstream = Upstream::start().await;
    let client = h1_client();
    let rewriting = RunningProxy::start(proxy_config(&upstream.url())).await;
    let mut config = proxy_config(&upstream.url());
    config.preserve_host = true;
    let preserving = RunningProxy::start(config).await;

    for proxy in [&rewriting, &preserving] {
        let request = get(&proxy.url("/h"))
            .header("host", "app.example:1234")
            .body(empty())
            .unwrap();
        let (parts, _) = send(&client, request).await;
        assert_eq!(parts.status, StatusCode::OK);
    }
    let seen = upstream.seen();
    assert_eq!(seen[0].all("host"), [upstream.addr.to_string()]);
    assert_eq!(seen[1].all("host"), ["app.example:1234"]);
}

#[tokio::test]
async fn hop_by_hop_fields_are_dropped_both_ways() {
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let response = raw(
        proxy.addr,
        "POST /hop HTTP/1.1\r\n\
         Host: app\r\n\
         Connection: close, X-Hop-A\r\n\
         Connection: x-hop-b\r\n\
         X-Hop-A: secret-a\r\n\
         X-Hop-B: secret-b\r\n\
         Keep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\n\
         Proxy-Authorization: Basic Zm9vOmJhcg==\r\n\
         TE: trailers\r\n\
         Trailer: x-trailer\r\n\
         Upgrade: websocket\r\n\
         X-End-To-End: kept\r\n\
         X-Test-Hop-Headers: 1\r\n\
         Content-Length: 5\r\n\
         \r\n\
         hello",
    )
    .await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"ok");

    let seen = &upstream.seen()[0];
    for name in [
        "x-hop-a",
        "x-hop-b",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
        "transfer-encoding",
    ] {
        assert!(seen.header(name).is_none(), "{name} reached the upstream");
    }
    // hyper's client may add its own `connection`, never the client's.
    assert!(
        seen.all("connection")
            .iter()
            .all(|v| !v.to_ascii_lowercase().contains("x-hop"))
    );
    assert_eq!(seen.header("x-end-to-end"), Some("kept"));
    assert_eq!(seen.body_len, 5);

    for name in ["x-resp-hop", "keep-alive", "proxy-authenticate", "upgrade"] {
        assert!(
            response.header(name).is_none(),
            "{name} reached the client: {:?}",
            response.headers
        );
    }
    // Only the proxy's own `Connection: close` (the client asked for it).
    let connection: Vec<_> = response
        .headers
        .iter()
        .filter(|(n, _)| n == "connection")
        .collect();
    assert!(
        connection
            .iter()
            .all(|(_, v)| v.eq_ignore_ascii_case("close")),
        "{connection:?}"
    );
    assert_eq!(response.header("x-resp-end-to-end"), Some("kept"));
    assert_eq!(response.header("x-upstream"), Some("yes"));
}

#[tokio::test]
async fn forwarded_headers_follow_the_switch() {
    let upstream = Upstream::start().await;
    let client = h1_client();
    let on = RunningProxy::start(proxy_config(&upstream.url())).await;
    let mut config = proxy_config(&upstream.url());
    config.forwarded_headers = false;
    let off = RunningProxy::start(config).await;

    for proxy in [&on, &off] {
        let request = get(&proxy.url("/f"))
            .header("host", "app.example")
            .header("x-forwarded-for", "10.1.2.3")
            .body(empty())
            .unwrap();
        send(&client, request).await;
    }
    let seen = upstream.seen();
    let with = &seen[0];
    assert_eq!(with.all("via"), ["1.1 sso-token-proxy"]);
    assert_eq!(with.all("x-forwarded-for"), ["10.1.2.3, 127.0.0.1"]);
    assert_eq!(with.all("x-forwarded-proto"), ["http"]);
    assert_eq!(with.all("x-forwarded-host"), ["app.example"]);
    let without = &seen[1];
    assert!(without.header("via").is_none());
    assert_eq!(without.all("x-forwarded-for"), ["10.1.2.3"]);
    assert!(without.header("x-forwarded-proto").is_none());
    assert!(without.header("x-forwarded-host").is_none());
}

#[tokio::test]
async fn every_set_cookie_is_kept() {
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let request = get(&proxy.url("/c"))
        .header("x-test-set-cookies", "1")
        .body(empty())
        .unwrap();
    let (parts, _) = send(&h1_client(), request).await;
    let cookies: Vec<_> = parts.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1; Path=/", "b=2; Path=/; HttpOnly"]);
}

#[tokio::test]
async fn ten_megabyte_bodies_stream_intact_both_ways() {
    const SIZE: usize = 10 * 1024 * 1024;
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let client = h1_client();

    // Upload: chunked, of unknown length, so it is streamed, not buffered.
    let request = Request::post(proxy.url("/upload"))
        .body(chunked_pattern(SIZE))
        .unwrap();
    let (parts, _) = send(&client, request).await;
    assert_eq!(parts.status, StatusCode::OK);
    let seen = &upstream.seen()[0];
    assert_eq!(seen.body_len, SIZE as u64);
    assert_eq!(seen.body_sha256, pattern_sha256(SIZE));

    // Download.
    let request = get(&proxy.url("/download"))
        .header("x-test-response-bytes", SIZE.to_string())
        .body(empty())
        .unwrap();
    let (parts, body) = send(&client, request).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.headers["content-length"], SIZE.to_string().as_str());
    assert_eq!(body.len(), SIZE);
    assert_eq!(hex(&Sha256::digest(&body)), pattern_sha256(SIZE));
}

#[tokio::test]
async fn h2c_client_reaches_an_http1_upstream() {
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let client = h2c_client();

    let request = Request::post(proxy.url("/h2?q=1"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("x-test-set-cookies", "1")
        .body(full("h2 body"))
        .unwrap();
    let (parts, body) = send(&client, request).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.version, Version::HTTP_2);
    assert_eq!(body, "ok");
    assert_eq!(parts.headers.get_all("set-cookie").iter().count(), 2);

    // Several streams on the one connection.
    let requests = (0..8).map(|i| {
        send(
            &client,
            get(&proxy.url(&format!("/many/{i}")))
                .body(empty())
                .unwrap(),
        )
    });
    for (parts, _) in futures_util::future::join_all(requests).await {
        assert_eq!(parts.status, StatusCode::OK);
    }

    let seen = upstream.seen();
    assert_eq!(seen.len(), 9);
    let first = &seen[0];
    assert_eq!(first.version, Version::HTTP_11);
    assert_eq!(first.uri, "/h2?q=1");
    assert_eq!(first.all("host"), [upstream.addr.to_string()]);
    assert_eq!(first.all("authorization"), ["Bearer token-1"]);
    assert_eq!(first.all("via"), ["2.0 sso-token-proxy"]);
    assert_eq!(first.all("x-forwarded-host"), [proxy.addr.to_string()]);
    assert_eq!(
        first.all("cookie"),
        ["a=1; b=2"],
        "h2 cookie fields joined for HTTP/1.1"
    );
    assert_eq!(first.body_len, 7);
    assert_eq!(proxy.source.calls(), 1);
}

#[tokio::test]
async fn absolute_form_naming_another_host_is_refused_and_never_forwarded() {
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let other = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_addr = other.local_addr().unwrap();

    for target in [
        format!("http://{other_addr}/steal"),
        format!("https://{other_addr}/steal"),
        "http://other.example/steal".to_owned(),
        format!("https://{}/steal", upstream.addr),
    ] {
        let response = raw(
            proxy.addr,
            &format!("GET {target} HTTP/1.1\r\nHost: {other_addr}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(response.status, 400, "{target}");
        assert_eq!(response.header("content-type"), Some("application/json"));
        let body = response.json();
        assert_eq!(body["error"], "foreign_target");
        assert!(body["message"].is_string());
    }
    // A forward would have connected before the refusal was written.
    assert!(
        other.accept().now_or_never().is_none(),
        "the other host was contacted"
    );
    assert!(upstream.seen().is_empty());
    assert_eq!(
        proxy.source.calls(),
        0,
        "no token was fetched for a refused request"
    );

    // Absolute form naming the upstream or the proxy itself is fine.
    for target in [
        format!("http://{}/mine", upstream.addr),
        format!("http://{}/mine", proxy.addr),
    ] {
        let response = raw(
            proxy.addr,
            &format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(response.status, 200, "{target}");
    }
    assert_eq!(upstream.seen().len(), 2);
}

#[tokio::test]
async fn connect_is_refused_with_405() {
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let other = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_addr = other.local_addr().unwrap();

    let response = raw(
        proxy.addr,
        &format!(
            "CONNECT {other_addr} HTTP/1.1\r\nHost: {other_addr}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(response.status, 405);
    assert!(response.header("allow").is_some());
    assert_eq!(response.json()["error"], "method_not_allowed");
    assert!(other.accept().now_or_never().is_none());
    assert!(upstream.seen().is_empty());
    assert_eq!(proxy.source.calls(), 0);

    // The same over h2.
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(format!("http://{other_addr}"))
        .body(empty())
        .unwrap();
    let response = tokio::time::timeout(HANG_GUARD, h2c_client_direct(proxy.addr, request))
        .await
        .unwrap();
    assert_eq!(response, StatusCode::METHOD_NOT_ALLOWED);
    assert!(upstream.seen().is_empty());
}

/// Sends one h2 request on a hand-made connection (the pooled client will
/// not send `CONNECT` to a plain-HTTP address) and returns its status.
async fn h2c_client_direct(
    addr: std::net::SocketAddr,
    request: Request<harness::TestBody>,
) -> StatusCode {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    sender.send_request(request).await.unwrap().status()
}

#[tokio::test]
async fn upstream_down_is_502_json() {
    // A port that was just free: connecting to it is refused.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = RunningProxy::start(proxy_config(&format!("http://{dead}"))).await;
    let (parts, body) = send(&h1_client(), get(&proxy.url("/x")).body(empty()).unwrap()).await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
    assert_eq!(parts.headers["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "upstream_unavailable");
    assert!(body["message"].is_string());
}

#[tokio::test]
async fn slow_upstream_is_504_json() {
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.upstream_response_timeout = Duration::from_millis(300);
    let proxy = RunningProxy::start(config).await;
    // The upstream holds this request until released, which it never is.
    let request = get(&proxy.url("/slow"))
        .header("x-test-hold", "1")
        .body(empty())
        .unwrap();
    let (parts, body) = send(&h1_client(), request).await;
    assert_eq!(parts.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(parts.headers["content-type"], "application/json");
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "upstream_timeout");
    assert_eq!(upstream.wait_arrived().await, "/slow");
}

#[tokio::test]
async fn failing_token_source_is_503_json_with_retry_after_and_kind() {
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start_with(proxy_config(&upstream.url()), true).await;
    let client = h1_client();
    for _ in 0..3 {
        let (parts, body) = send(&client, get(&proxy.url("/x")).body(empty()).unwrap()).await;
        assert_eq!(parts.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(parts.headers["content-type"], "application/json");
        let retry_after: u64 = parts.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry_after >= 1);
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"], "token_unavailable");
        assert_eq!(body["kind"], "InvalidGrant");
        assert!(body["message"].is_string());
    }
    assert!(
        upstream.seen().is_empty(),
        "nothing is forwarded without a token"
    );
    assert_eq!(proxy.source.calls(), 1, "the failure is remembered");
}

#[tokio::test]
async fn upstream_401_refreshes_once_and_replays_a_buffered_request() {
    let upstream = Upstream::start().await;
    upstream.reject("Bearer token-1");
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let client = h1_client();

    let (parts, body) = send(&client, get(&proxy.url("/r")).body(empty()).unwrap()).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body, "ok");
    // A small body of known length is replayed intact.
    let request = Request::post(proxy.url("/r"))
        .body(full("small body"))
        .unwrap();
    let (parts, _) = send(&client, request).await;
    assert_eq!(parts.status, StatusCode::OK);

    let seen = upstream.seen();
    let tokens: Vec<_> = seen
        .iter()
        .map(|s| s.header("authorization").unwrap())
        .collect();
    assert_eq!(
        tokens,
        ["Bearer token-1", "Bearer token-2", "Bearer token-2"]
    );
    assert_eq!(seen[2].body_len, 10);
    assert_eq!(proxy.source.calls(), 2, "one refresh");
}

#[tokio::test]
async fn a_replay_after_a_401_sends_the_first_attempt_again_with_the_new_token() {
    let upstream = Upstream::start().await;
    upstream.reject("Bearer token-1");
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let client = h1_client();

    let request = Request::put(proxy.url("/r/items?x=1&x=2"))
        .header("x-multi", "one")
        .header("accept", "text/plain")
        .header("x-multi", "two")
        .header("cookie", "a=1")
        .body(full("replayed body"))
        .unwrap();
    let (parts, _) = send(&client, request).await;
    assert_eq!(parts.status, StatusCode::OK);

    let seen = upstream.seen();
    assert_eq!(seen.len(), 2, "the request and its replay");
    let (first, replay) = (&seen[0], &seen[1]);
    assert_eq!(first.header("authorization"), Some("Bearer token-1"));
    assert_eq!(replay.header("authorization"), Some("Bearer token-2"));
    assert_eq!(
        (&replay.method, &replay.uri, replay.version),
        (&first.method, &first.uri, first.version)
    );
    // Every other field, its values and their order, as first sent.
    let without_token = |headers: &http::HeaderMap| {
        headers
            .iter()
            .filter(|(name, _)| *name != http::header::AUTHORIZATION)
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        without_token(&replay.headers),
        without_token(&first.headers)
    );
    assert_eq!(replay.all("x-multi"), ["one", "two"]);
    assert_eq!(
        (replay.body_len, &replay.body_sha256),
        (first.body_len, &first.body_sha256)
    );
    assert_eq!(replay.body_len, 13);
}

#[tokio::test]
async fn upstream_401_passes_through_for_a_streamed_body() {
    const SIZE: usize = 2 * 1024 * 1024;
    let upstream = Upstream::start().await;
    upstream.reject("Bearer token-1");
    let mut config = proxy_config(&upstream.url());
    config.max_replay_body_bytes = 1024;
    let proxy = RunningProxy::start(config).await;
    let client = h1_client();

    let request = Request::post(proxy.url("/big"))
        .body(chunked_pattern(SIZE))
        .unwrap();
    let (parts, body) = send(&client, request).await;
    assert_eq!(parts.status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, "rejected");
    assert_eq!(upstream.seen().len(), 1, "a streamed body is sent once");
    assert_eq!(upstream.seen()[0].body_len, SIZE as u64);

    // The rejected token was dropped: the next request gets a new one.
    let (parts, _) = send(&client, get(&proxy.url("/after")).body(empty()).unwrap()).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(
        upstream.seen()[1].header("authorization"),
        Some("Bearer token-2")
    );
    assert_eq!(proxy.source.calls(), 2);
}

/// Issue 12: an upstream that rejects everything gets each request once,
/// plus one replay per forced refresh; the token source is asked a handful
/// of times, not once per request.
#[tokio::test]
async fn upstream_rejecting_everything_causes_a_handful_of_refreshes_not_one_per_request() {
    let upstream = Upstream::start().await;
    upstream.reject_all();
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let client = h1_client();

    for i in 0..200 {
        let request = Request::post(proxy.url(&format!("/r/{i}")))
            .body(full("replayable"))
            .unwrap();
        let (parts, body) = send(&client, request).await;
        assert_eq!(parts.status, StatusCode::UNAUTHORIZED);
        assert_eq!(body, "rejected", "the upstream's 401 is handed back");
        assert_eq!(parts.headers["www-authenticate"], "Bearer");
    }
    // The first token and three forced refreshes (the default budget).
    assert_eq!(proxy.source.calls(), 4);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 200 + 3, "one replay per forced refresh");
    let per_path = |i: usize| {
        seen.iter()
            .filter(|s| s.uri == format!("/r/{i}"))
            .map(|s| s.header("authorization").unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(per_path(0), ["Bearer token-1", "Bearer token-2"]);
    assert_eq!(per_path(1), ["Bearer token-2", "Bearer token-3"]);
    assert_eq!(per_path(2), ["Bearer token-3", "Bearer token-4"]);
    for i in 3..200 {
        assert_eq!(per_path(i), ["Bearer token-4"], "request {i}");
    }
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests_and_refuses_new_ones() {
    let upstream = Upstream::start().await;
    let mut proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let client = h1_client();
    let in_flight = {
        let request = get(&proxy.url("/slow"))
            .header("x-test-hold", "1")
            .body(empty())
            .unwrap();
        let client = client.clone();
        tokio::spawn(async move { send(&client, request).await })
    };
    assert_eq!(upstream.wait_arrived().await, "/slow");

    proxy.begin_shutdown();
    let mut refused = false;
    for _ in 0..500 {
        match TcpStream::connect(proxy.addr).await {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    assert!(
        refused,
        "new connections are still accepted after shutdown began"
    );
    assert!(
        proxy.is_serving(),
        "serve returned with a request in flight"
    );

    upstream.release();
    let (parts, body) = tokio::time::timeout(HANG_GUARD, in_flight)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(body, "ok");
    proxy.join().await.expect("serve returns Ok");
}

#[tokio::test]
async fn shutdown_grace_bounds_the_drain() {
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.shutdown_grace = Duration::from_millis(200);
    let mut proxy = RunningProxy::start(config).await;
    let in_flight = {
        let request = get(&proxy.url("/stuck"))
            .header("x-test-hold", "1")
            .body(empty())
            .unwrap();
        let client = h1_client();
        tokio::spawn(async move { client.request(request).await })
    };
    upstream.wait_arrived().await;
    proxy.begin_shutdown();
    // Never released: `serve` returns once the grace period is over.
    proxy.join().await.expect("serve returns Ok");
    let result = tokio::time::timeout(HANG_GUARD, in_flight)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_err(), "the stuck request's connection was closed");
}

#[tokio::test]
async fn https_upstream_offering_h2_gets_http2_whatever_the_client_speaks() {
    let (upstream, ca_file) = Upstream::start_tls(&[b"h2", b"http/1.1"]).await;
    let mut config = proxy_config(&format!("{}/api", upstream.https_url()));
    config.upstream_ca_file = Some(ca_file.path().to_owned());
    let proxy = RunningProxy::start(config).await;

    let request = Request::post(proxy.url("/from-h1?x=1"))
        .body(chunked_pattern(300_000))
        .unwrap();
    let (parts, body) = send(&h1_client(), request).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.version, Version::HTTP_11);
    assert_eq!(body, "ok");
    let request = get(&proxy.url("/from-h2"))
        .header("x-test-set-cookies", "1")
        .body(empty())
        .unwrap();
    let (parts, _) = send(&h2c_client(), request).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.headers.get_all("set-cookie").iter().count(), 2);

    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.version, Version::HTTP_2);
        assert_eq!(s.all("authorization"), ["Bearer token-1"]);
    }
    assert_eq!(seen[0].method, "POST");
    assert!(seen[0].uri.ends_with("/api/from-h1?x=1"), "{}", seen[0].uri);
    assert_eq!(seen[0].body_len, 300_000);
    assert_eq!(seen[0].body_sha256, pattern_sha256(300_000));
    assert!(seen[1].uri.ends_with("/api/from-h2"), "{}", seen[1].uri);
}

#[tokio::test]
async fn https_upstream_without_h2_gets_http11() {
    let (upstream, ca_file) = Upstream::start_tls(&[b"http/1.1"]).await;
    let mut config = proxy_config(&upstream.https_url());
    config.upstream_ca_file = Some(ca_file.path().to_owned());
    let proxy = RunningProxy::start(config).await;

    let (parts, _) = send(&h2c_client(), get(&proxy.url("/x")).body(empty()).unwrap()).await;
    assert_eq!(parts.status, StatusCode::OK);
    let seen = upstream.seen();
    assert_eq!(seen[0].version, Version::HTTP_11);
    assert_eq!(seen[0].uri, "/x");
    assert_eq!(seen[0].all("host"), [upstream.addr.to_string()]);
}

#[tokio::test]
async fn https_upstream_with_an_untrusted_certificate_is_502() {
    let (upstream, _ca_file) = Upstream::start_tls(&[b"h2", b"http/1.1"]).await;
    // No `upstream_ca_file`: the self-signed certificate is not trusted.
    let proxy = RunningProxy::start(proxy_config(&upstream.https_url())).await;
    let (parts, body) = send(&h1_client(), get(&proxy.url("/x")).body(empty()).unwrap()).await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"], "upstream_unavailable");
    assert!(
        upstream.seen().is_empty(),
        "no request, and so no token, over an unverified connection"
    );
}

#[tokio::test]
async fn idle_connections_are_closed_but_busy_ones_are_not() {
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.idle_timeout = Duration::from_millis(300);
    let proxy = RunningProxy::start(config).await;

    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    let mut connection = tokio::spawn(connection);

    // A request that outlasts the idle timeout several times over.
    let held = sender.send_request(
        get("/held")
            .header("x-test-hold", "1")
            .body(empty())
            .unwrap(),
    );
    let held = tokio::spawn(held);
    upstream.wait_arrived().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Still open for new streams: no GOAWAY was sent while one was busy.
    let second = sender.send_request(get("/second").body(empty()).unwrap());
    let second = tokio::time::timeout(HANG_GUARD, second).await.unwrap();
    assert_eq!(
        second.expect("connection still open").status(),
        StatusCode::OK
    );
    upstream.release();
    let response = tokio::time::timeout(HANG_GUARD, held)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drop(response);

    // Then idle: the proxy closes the connection (GOAWAY), the client's
    // connection task ends.
    let ended = tokio::time::timeout(HANG_GUARD, &mut connection).await;
    assert!(ended.is_ok(), "idle connection never closed");
}

/// Sends `n` requests at once that the upstream holds until all have
/// arrived, then lets them answer; every one must be a `200`.
async fn concurrent_held_requests(proxy: &RunningProxy, upstream: &Upstream, n: usize) {
    let client = h1_client();
    let pending: Vec<_> = (0..n)
        .map(|i| {
            let request = get(&proxy.url(&format!("/held/{i}")))
                .header("x-test-hold", "1")
                .body(empty())
                .unwrap();
            let client = client.clone();
            tokio::spawn(async move { send(&client, request).await })
        })
        .collect();
    for _ in 0..n {
        upstream.wait_arrived().await;
    }
    upstream.release();
    for response in pending {
        answered_ok(response).await;
    }
}

#[tokio::test]
async fn upstream_connections_are_pooled_and_reused() {
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;

    let client = h1_client();
    for i in 0..20 {
        let (parts, _) = send(
            &client,
            get(&proxy.url(&format!("/seq/{i}"))).body(empty()).unwrap(),
        )
        .await;
        assert_eq!(parts.status, StatusCode::OK);
    }
    assert_eq!(
        upstream.connections(),
        1,
        "one request at a time needs one connection"
    );

    // Six at once need six connections: the pooled one and five new ones.
    concurrent_held_requests(&proxy, &upstream, 6).await;
    assert_eq!(upstream.connections(), 6);
    // All six went back to the pool and serve the next six.
    concurrent_held_requests(&proxy, &upstream, 6).await;
    assert_eq!(upstream.connections(), 6);
    assert_eq!(upstream.seen().len(), 32);
}

#[tokio::test]
async fn above_upstream_connect_wait_above_a_request_waits_for_a_connection_to_come_back() {
    // One connection opened without waiting; the next request finds it
    // busy and waits for it (up to 10 s) instead of opening a second.
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.upstream_connect_wait_above = 1;
    config.upstream_connect_wait = Duration::from_secs(10);
    config.upstream_queue_timeout = Duration::from_secs(30);
    let proxy = RunningProxy::start(config).await;
    let client = h1_client();

    let held = get(&proxy.url("/first"))
        .header("x-test-hold", "1")
        .body(empty())
        .unwrap();
    let first = tokio::spawn({
        let client = client.clone();
        async move { send(&client, held).await }
    });
    assert_eq!(upstream.wait_arrived().await, "/first");
    let mut second = tokio::spawn({
        let client = client.clone();
        let request = get(&proxy.url("/second")).body(empty()).unwrap();
        async move { send(&client, request).await }
    });
    // While the only connection is held, the second request is not
    // answered; a second connection would have answered it at once. (A
    // correct proxy cannot fail this by timing: the second request has no
    // other way to the upstream.)
    let early = tokio::time::timeout(Duration::from_millis(300), &mut second).await;
    assert!(
        early.is_err(),
        "the second request was answered while the first held the only connection"
    );
    assert_eq!(upstream.connections(), 1);

    upstream.release();
    for response in [first, second] {
        answered_ok(response).await;
    }
    let order: Vec<String> = upstream.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(order, ["/first", "/second"]);
    assert_eq!(
        upstream.connections(),
        1,
        "the second request was handed the first's connection"
    );
}

#[tokio::test]
async fn a_request_that_waited_upstream_connect_wait_in_vain_opens_a_connection() {
    // The only connection stays busy: after `upstream_connect_wait` the
    // waiting request opens a second one instead of waiting for the first
    // (which a slow upstream would make it do for as long as it answers).
    const WAIT: Duration = Duration::from_millis(150);
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.upstream_connect_wait_above = 1;
    config.upstream_connect_wait = WAIT;
    let proxy = RunningProxy::start(config).await;
    let client = h1_client();

    let held = get(&proxy.url("/held"))
        .header("x-test-hold", "1")
        .body(empty())
        .unwrap();
    let first = tokio::spawn({
        let client = client.clone();
        async move { send(&client, held).await }
    });
    upstream.wait_arrived().await;
    let started = tokio::time::Instant::now();
    let (parts, _) = tokio::time::timeout(
        HANG_GUARD,
        send(&client, get(&proxy.url("/after")).body(empty()).unwrap()),
    )
    .await
    .expect("the waiting request opened no connection");
    assert_eq!(parts.status, StatusCode::OK);
    assert!(
        started.elapsed() >= WAIT,
        "answered after {:?}, before upstream_connect_wait ran out",
        started.elapsed()
    );
    assert_eq!(upstream.connections(), 2);

    upstream.release();
    answered_ok(first).await;
}

#[tokio::test]
async fn below_upstream_connect_wait_above_busy_connections_are_not_waited_for() {
    // Two held requests with room for two connections: the second opens
    // its own at once, however long `upstream_connect_wait` is.
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.upstream_connect_wait_above = 2;
    config.upstream_connect_wait = Duration::from_secs(60);
    config.upstream_queue_timeout = Duration::from_secs(120);
    let proxy = RunningProxy::start(config).await;
    // Both must reach the upstream while neither has been answered.
    concurrent_held_requests(&proxy, &upstream, 2).await;
    assert_eq!(upstream.connections(), 2);
}

#[tokio::test]
async fn a_connection_returns_to_the_pool_after_a_streamed_response() {
    // A response too large to have been read when its head arrives: the
    // connection goes back to the pool once its body has been relayed.
    const SIZE: usize = 1024 * 1024;
    let upstream = Upstream::start().await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;
    let client = h1_client();
    for i in 0..3 {
        let request = get(&proxy.url(&format!("/download/{i}")))
            .header("x-test-response-bytes", SIZE.to_string())
            .body(empty())
            .unwrap();
        let (parts, body) = send(&client, request).await;
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(body.len(), SIZE);
    }
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn a_response_the_client_abandons_leaves_the_pool_usable() {
    // The upstream connection is driven by the client's connection while
    // it relays the body; a client that goes away half-way must not leave
    // it half-read in the pool, or hold a place under the cap.
    const SIZE: usize = 4 * 1024 * 1024;
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.upstream_max_connections = 1;
    let proxy = RunningProxy::start(config).await;
    for round in 0..3 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let request = format!(
            "GET /big/{round} HTTP/1.1\r\nHost: x\r\nx-test-response-bytes: {SIZE}\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut some = vec![0u8; 64 * 1024];
        let mut read = 0;
        while read < some.len() {
            let n = tokio::time::timeout(HANG_GUARD, stream.read(&mut some[read..]))
                .await
                .expect("the body starts in time")
                .unwrap();
            assert_ne!(n, 0, "closed before 64 KiB of a {SIZE}-byte body");
            read += n;
        }
        drop(stream);

        // With one upstream connection allowed, the next request is only
        // served if the abandoned one was finished off or closed.
        let (parts, body) = tokio::time::timeout(
            HANG_GUARD,
            send(
                &h1_client(),
                get(&proxy.url("/after")).body(empty()).unwrap(),
            ),
        )
        .await
        .expect("a request after an abandoned response is served");
        assert_eq!(parts.status, StatusCode::OK, "round {round}");
        assert_eq!(body, "ok");
    }
    assert_eq!(upstream.seen().len(), 6);
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_used() {
    // The upstream closes keep-alive connections idle for 100 ms, well
    // before the proxy's own idle timeout would.
    let upstream = Upstream::start_closing_idle_after(Duration::from_millis(100)).await;
    let proxy = RunningProxy::start(proxy_config(&upstream.url())).await;

    for round in 1..=3 {
        let (parts, body) = send(&h1_client(), get(&proxy.url("/x")).body(empty()).unwrap()).await;
        assert_eq!(parts.status, StatusCode::OK, "round {round}: {body:?}");
        assert_eq!(upstream.connections(), round);
        upstream.wait_ended(round).await;
    }
}

#[tokio::test]
async fn idle_upstream_connections_are_closed_after_idle_timeout() {
    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.idle_timeout = Duration::from_millis(300);
    let proxy = RunningProxy::start(config).await;

    let (parts, _) = send(&h1_client(), get(&proxy.url("/x")).body(empty()).unwrap()).await;
    assert_eq!(parts.status, StatusCode::OK);
    let answered = tokio::time::Instant::now();
    upstream.wait_ended(1).await;
    let idle = answered.elapsed();
    assert!(idle >= Duration::from_millis(300), "closed after {idle:?}");

    // The next request gets a new connection.
    let (parts, _) = send(&h1_client(), get(&proxy.url("/y")).body(empty()).unwrap()).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(upstream.connections(), 2);
}

/// An upstream that makes the keep-alive race certain: every connection
/// answers its first request, then reads the next one and closes without a
/// word, as a server does whose idle timer fired just as the request came.
/// Returns its address and the count of connections it accepted.
async fn upstream_dropping_second_requests() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn read_head(stream: &mut TcpStream) -> bool {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        true
    }

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if read_head(&mut stream).await {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
                // The second request is read, then the connection dropped.
                let _ = read_head(&mut stream).await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn an_idempotent_request_lost_on_a_stale_connection_is_sent_again() {
    let (addr, accepted) = upstream_dropping_second_requests().await;
    let mut config = proxy_config(&format!("http://{addr}"));
    // The pool's reaper ticks every 500 ms; connections idle over 2 s close.
    config.idle_timeout = Duration::from_secs(2);
    let proxy = RunningProxy::start(config).await;

    let (parts, _) = send(&h1_client(), get(&proxy.url("/a")).body(empty()).unwrap()).await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // Idle across at least one reaper tick (well under `idle_timeout`): the
    // pooled connection is reused, the upstream drops the request, and the
    // GET goes out again on a new connection.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (parts, body) = send(&h1_client(), get(&proxy.url("/b")).body(empty()).unwrap()).await;
    assert_eq!(parts.status, StatusCode::OK, "{body:?}");
    assert_eq!(body, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);

    // A POST is not idempotent: it may have been acted on, so it is never
    // sent twice; the client gets the 502.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let request = Request::post(proxy.url("/c"))
        .body(full("payload"))
        .unwrap();
    let (parts, _) = send(&h1_client(), request).await;
    assert_eq!(parts.status, StatusCode::BAD_GATEWAY);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn concurrent_requests_share_one_http2_upstream_connection() {
    let (upstream, ca_file) = Upstream::start_tls(&[b"h2", b"http/1.1"]).await;
    let mut config = proxy_config(&upstream.https_url());
    config.upstream_ca_file = Some(ca_file.path().to_owned());
    let proxy = RunningProxy::start(config).await;

    let (parts, _) = send(
        &h1_client(),
        get(&proxy.url("/first")).body(empty()).unwrap(),
    )
    .await;
    assert_eq!(parts.status, StatusCode::OK);
    concurrent_held_requests(&proxy, &upstream, 8).await;
    assert_eq!(upstream.connections(), 1, "h2 multiplexes: one connection");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 9);
    assert!(seen.iter().all(|s| s.version == Version::HTTP_2));
}

#[tokio::test]
async fn end_to_end_against_the_emulator_echo_resource() {
    use sso_token_proxy::{
        cache::{CacheOptions, TokenCache},
        emulator::{Emulator, EmulatorConfig},
        oidc::OidcClient,
        proxy::Proxy,
        token::RefreshTokenSource,
    };

    let emulator = Emulator::start(EmulatorConfig::default()).await.unwrap();
    let (client_id, client_secret) = emulator.register_client("proxy-test");
    let refresh_token = emulator.issue_refresh_token(&client_id, &[]);
    let oidc = OidcClient::builder()
        .endpoint(emulator.url())
        .call_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let source = RefreshTokenSource::builder(oidc, client_id, client_secret, refresh_token)
        .build()
        .unwrap();
    let cache = TokenCache::new(source, CacheOptions::default());
    let proxy = Proxy::new(&proxy_config(&emulator.url()), cache).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(proxy.serve(listener, async move {
        let _ = stopped.await;
    }));
    let client = h1_client();
    let url = format!("http://{addr}/anything?k=v");

    let (parts, body) = send(&client, get(&url).body(empty()).unwrap()).await;
    assert_eq!(parts.status, StatusCode::OK);
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["authorized"], true);
    assert_eq!(echo["path"], "/anything");
    assert_eq!(echo["query"], "k=v");

    // The emulator forgets every token: the echo answers 401, the proxy
    // refreshes once and replays.
    emulator.revoke_access_tokens();
    let (parts, body) = send(&client, get(&url).body(empty()).unwrap()).await;
    assert_eq!(parts.status, StatusCode::OK);
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["authorized"], true);
    let counters = emulator.counters();
    assert_eq!(counters.create_token, 2);
    assert_eq!(counters.echo_unauthorized, 1);

    let _ = stop.send(());
    tokio::time::timeout(HANG_GUARD, serve)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_request_head_that_never_completes_is_cut_off() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let upstream = Upstream::start().await;
    let mut config = proxy_config(&upstream.url());
    config.header_read_timeout = Duration::from_millis(300);
    let proxy = RunningProxy::start(config).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /slowloris HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // The proxy closes the connection; reading ends instead of hanging.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(HANG_GUARD, stream.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "connection still open");
    assert!(upstream.seen().is_empty());
}
