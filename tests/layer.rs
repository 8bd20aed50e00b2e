//! Tests of `BearerTokenLayer`: against `tower_test` mocks, and over real
//! sockets against the emulator's protected echo resource.

use std::{
    future::Future,
    io::Write,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use futures_util::future::join_all;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header::AUTHORIZATION};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::Value;
use sso_token_proxy::{
    Lookup, Rejection, Secret,
    cache::{CacheOptions, TokenCache, TokenUnavailable},
    emulator::{Emulator, EmulatorConfig, EmulatorHandle, Fault, SeedClient},
    layer::{
        BearerTokenError, BearerTokenLayer, BearerTokenService, ReplayBody, ReplayableBody,
        TokenProvider, unavailable_response,
    },
    oidc::{ErrorClass, OidcClient, OidcError, Operation, ServiceErrorKind},
    token::{FetchFuture, RefreshTokenSource, Reuse, Token, TokenError, TokenSource},
};
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;
use tracing::Instrument as _;

type Body = Full<Bytes>;
type Mock<B> = mock::Mock<Request<B>, Response<Body>>;
type MockHandle<B> = mock::Handle<Request<B>, Response<Body>>;

// === a token source under test control ===

#[derive(Default)]
struct FakeState {
    fetches: AtomicU64,
    fail_with: Mutex<Option<ServiceErrorKind>>,
}

#[derive(Clone, Default)]
struct FakeSource(Arc<FakeState>);

impl FakeSource {
    fn fetches(&self) -> u64 {
        self.0.fetches.load(Ordering::SeqCst)
    }

    fn fail_with(&self, kind: ServiceErrorKind) {
        *self.0.fail_with.lock().unwrap() = Some(kind);
    }
}

impl TokenSource for FakeSource {
    fn identity(&self) -> String {
        "fake".into()
    }

    fn scopes(&self) -> &[String] {
        &[]
    }

    fn fetch(&self, _reuse: Reuse) -> FetchFuture<'_> {
        Box::pin(async move {
            let n = self.0.fetches.fetch_add(1, Ordering::SeqCst);
            if let Some(kind) = *self.0.fail_with.lock().unwrap() {
                return Err(TokenError::Oidc(OidcError::Service {
                    operation: Operation::CreateToken,
                    kind,
                    details: Box::default(),
                }));
            }
            Ok(Token::new(
                Secret::new(format!("fake-{n}")),
                Duration::from_secs(3600),
            ))
        })
    }
}

fn fake_cache() -> (FakeSource, TokenCache) {
    logs();
    let source = FakeSource::default();
    let cache = TokenCache::new(source.clone(), CacheOptions::default());
    (source, cache)
}

fn mocked<B, P: TokenProvider>(
    layer: BearerTokenLayer<P>,
) -> (BearerTokenService<Mock<B>, P>, MockHandle<B>) {
    let (mock, handle) = mock::pair();
    (layer.layer(mock), handle)
}

fn request(body: &'static str) -> Request<Body> {
    Request::post("http://upstream.test/items")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(Body::default());
    *response.status_mut() = code;
    response
}

async fn body_bytes<B>(body: B) -> Bytes
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    body.collect().await.unwrap().to_bytes()
}

/// Sends `request` through `service` on a task of its own, so the mock's
/// handle can answer it.
async fn spawn_call<S, B>(
    service: &mut S,
    request: Request<B>,
) -> tokio::task::JoinHandle<Result<S::Response, S::Error>>
where
    S: Service<Request<B>>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static + std::fmt::Debug,
{
    let future = service.ready().await.unwrap().call(request);
    tokio::spawn(future)
}

// === header ===

#[tokio::test]
async fn sets_a_sensitive_bearer_header_on_miss_and_on_hit() {
    let (source, cache) = fake_cache();
    let (mut service, mut handle) = mocked::<Body, _>(BearerTokenLayer::new(cache.clone()));

    // Cold cache: the token is fetched, then the service polled ready is called.
    for _ in 0..2 {
        let call = spawn_call(&mut service, request("{}")).await;
        let (seen, reply) = handle.next_request().await.unwrap();
        let value = seen.headers().get(AUTHORIZATION).unwrap();
        assert_eq!(value, "Bearer fake-0");
        assert!(value.is_sensitive());
        reply.send_response(status(StatusCode::OK));
        assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(source.fetches(), 1);
}

#[tokio::test]
async fn replaces_every_authorization_value_the_caller_sent() {
    let (_source, cache) = fake_cache();
    let (mut service, mut handle) = mocked::<Body, _>(BearerTokenLayer::new(cache));

    let mut req = request("{}");
    req.headers_mut().append(
        AUTHORIZATION,
        HeaderValue::from_static("Basic dXNlcjpwYXNz"),
    );
    req.headers_mut().append(
        AUTHORIZATION,
        HeaderValue::from_static("Bearer callers-own"),
    );
    let call = spawn_call(&mut service, req).await;
    let (seen, reply) = handle.next_request().await.unwrap();
    let values: Vec<_> = seen.headers().get_all(AUTHORIZATION).iter().collect();
    assert_eq!(values, ["Bearer fake-0"]);
    assert_eq!(seen.headers()["content-type"], "application/json");
    reply.send_response(status(StatusCode::OK));
    call.await.unwrap().unwrap();
}

#[tokio::test]
async fn custom_header_name_and_prefix() {
    let (_source, cache) = fake_cache();
    let name = HeaderName::from_static("x-upstream-token");
    let layer = BearerTokenLayer::new(cache)
        .header_name(name.clone())
        .prefix(HeaderValue::from_static("Token "));
    let (mut service, mut handle) = mocked::<Body, _>(layer);

    for _ in 0..2 {
        let mut req = request("{}");
        req.headers_mut()
            .append(name.clone(), HeaderValue::from_static("old-1"));
        req.headers_mut()
            .append(name.clone(), HeaderValue::from_static("old-2"));
        req.headers_mut()
            .insert(AUTHORIZATION, HeaderValue::from_static("Basic x"));
        let call = spawn_call(&mut service, req).await;
        let (seen, reply) = handle.next_request().await.unwrap();
        let values: Vec<_> = seen.headers().get_all(&name).iter().collect();
        assert_eq!(values, ["Token fake-0"]);
        assert!(values[0].is_sensitive());
        // Another header name leaves `Authorization` alone.
        assert_eq!(seen.headers()[AUTHORIZATION], "Basic x");
        reply.send_response(status(StatusCode::OK));
        call.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn prefix_is_any_header_value_even_empty_or_not_utf8() {
    for prefix in [&b""[..], b"Token ", b"T\xe9ken "] {
        let (_source, cache) = fake_cache();
        let layer = BearerTokenLayer::new(cache).prefix(HeaderValue::from_bytes(prefix).unwrap());
        let (mut service, mut handle) = mocked::<Body, _>(layer);
        let call = spawn_call(&mut service, request("{}")).await;
        let (seen, reply) = handle.next_request().await.unwrap();
        let mut expected = prefix.to_vec();
        expected.extend_from_slice(b"fake-0");
        assert_eq!(seen.headers()[AUTHORIZATION].as_bytes(), expected);
        assert!(seen.headers()[AUTHORIZATION].is_sensitive());
        reply.send_response(status(StatusCode::OK));
        call.await.unwrap().unwrap();
    }
}

// === a provider of one's own ===

/// A `TokenProvider` that is not a `TokenCache`: issues `own-0`, `own-1`, ...
/// on `get`, and records every call.
#[derive(Debug, Clone, Default)]
struct OwnProvider(Arc<Mutex<OwnState>>);

#[derive(Debug, Default)]
struct OwnState {
    current: Option<Arc<Token>>,
    lookups: u64,
    gets: u64,
    rejected: Vec<String>,
    refuse_rejections: bool,
}

impl TokenProvider for OwnProvider {
    fn lookup(&self) -> Lookup {
        let mut state = self.0.lock().unwrap();
        state.lookups += 1;
        match &state.current {
            Some(token) => Lookup::Hit(Arc::clone(token)),
            None => Lookup::Miss,
        }
    }

    fn get(&self) -> impl Future<Output = Result<Arc<Token>, TokenUnavailable>> + Send + 'static {
        let mut state = self.0.lock().unwrap();
        let n = state.gets;
        state.gets += 1;
        let token = state
            .current
            .get_or_insert_with(|| {
                Arc::new(Token::new(
                    Secret::new(format!("own-{n}")),
                    Duration::from_secs(3600),
                ))
            })
            .clone();
        std::future::ready(Ok(token))
    }

    fn reject(&self, token: &Token) -> Rejection {
        let mut state = self.0.lock().unwrap();
        state
            .rejected
            .push(token.access_token().expose().to_owned());
        if state.refuse_rejections {
            return Rejection::Limited;
        }
        if state.current.as_ref().is_some_and(|c| c.id() == token.id()) {
            state.current = None;
        }
        Rejection::Refresh
    }
}

#[tokio::test]
async fn the_layer_takes_tokens_from_a_provider_of_ones_own() {
    let provider = OwnProvider::default();
    let (mut service, mut handle) = mocked::<Body, _>(BearerTokenLayer::new(provider.clone()));
    let state = |f: fn(&OwnState) -> u64| f(&provider.0.lock().unwrap());

    // Miss: one `get`; hit: none.
    for _ in 0..2 {
        let call = spawn_call(&mut service, request("{}")).await;
        let (seen, reply) = handle.next_request().await.unwrap();
        assert_eq!(seen.headers()[AUTHORIZATION], "Bearer own-0");
        reply.send_response(status(StatusCode::OK));
        assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(state(|s| s.lookups), 2);
    assert_eq!(state(|s| s.gets), 1);

    // 401: the provider is told which token was rejected, and the replay
    // carries the token `get` hands out next.
    let call = spawn_call(&mut service, request(r#"{"n":3}"#)).await;
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(status(StatusCode::UNAUTHORIZED));
    let (replay, reply) = handle.next_request().await.unwrap();
    assert_eq!(replay.headers()[AUTHORIZATION], "Bearer own-1");
    assert_eq!(body_bytes(replay.into_body()).await, r#"{"n":3}"#);
    reply.send_response(status(StatusCode::OK));
    assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(provider.0.lock().unwrap().rejected, ["own-0"]);
    assert_eq!(state(|s| s.gets), 2);

    // A provider that refuses: the 401 comes back, nothing is replayed or
    // fetched.
    provider.0.lock().unwrap().refuse_rejections = true;
    let call = spawn_call(&mut service, request("{}")).await;
    let (seen, reply) = handle.next_request().await.unwrap();
    assert_eq!(seen.headers()[AUTHORIZATION], "Bearer own-1");
    reply.send_response(status(StatusCode::UNAUTHORIZED));
    assert_eq!(
        call.await.unwrap().unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert!(handle.poll_request().is_pending(), "no replay");
    assert_eq!(provider.0.lock().unwrap().rejected, ["own-0", "own-1"]);
    assert_eq!(state(|s| s.gets), 2);
    assert_eq!(service.provider().0.lock().unwrap().lookups, 4);
}

// === readiness ===

#[tokio::test]
async fn poll_ready_follows_the_inner_service() {
    let (_source, cache) = fake_cache();
    let (mut service, mut handle) =
        mock::spawn_layer::<Request<Body>, Response<Body>, _>(BearerTokenLayer::new(cache));

    handle.allow(0);
    assert!(service.poll_ready().is_pending());
    handle.allow(1);
    assert!(matches!(
        service.poll_ready(),
        std::task::Poll::Ready(Ok(()))
    ));

    let call = tokio::spawn(service.call(request("{}")));
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(status(StatusCode::OK));
    assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);

    handle.send_error("inner broke");
    match service.poll_ready() {
        std::task::Poll::Ready(Err(BearerTokenError::Inner(e))) => {
            assert_eq!(e.to_string(), "inner broke")
        }
        other => panic!("expected the inner error, got {other:?}"),
    }
}

// === 401 ===

#[tokio::test]
async fn unauthorized_replays_a_buffered_request_once_with_a_new_token() {
    let (source, cache) = fake_cache();
    let (mut service, mut handle) = mocked::<Body, _>(BearerTokenLayer::new(cache.clone()));

    let call = spawn_call(&mut service, request(r#"{"n":1}"#)).await;
    let (first, reply) = handle.next_request().await.unwrap();
    assert_eq!(first.headers()[AUTHORIZATION], "Bearer fake-0");
    reply.send_response(status(StatusCode::UNAUTHORIZED));

    let (replay, reply) = handle.next_request().await.unwrap();
    assert_eq!(replay.headers()[AUTHORIZATION], "Bearer fake-1");
    assert!(replay.headers()[AUTHORIZATION].is_sensitive());
    assert_eq!(replay.method(), first.method());
    assert_eq!(replay.uri(), first.uri());
    assert_eq!(replay.headers()["content-type"], "application/json");
    assert_eq!(body_bytes(replay.into_body()).await, r#"{"n":1}"#);
    reply.send_response(status(StatusCode::OK));

    assert_eq!(call.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(source.fetches(), 2);
    assert_eq!(cache.stats().invalidations, 1);
}

#[tokio::test]
async fn a_second_unauthorized_is_final() {
    let (source, cache) = fake_cache();
    let (mut service, mut handle) = mocked::<Body, _>(BearerTokenLayer::new(cache));

    let call = spawn_call(&mut service, request("{}")).await;
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(status(StatusCode::UNAUTHORIZED));
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(status(StatusCode::UNAUTHORIZED));

    assert_eq!(
        call.await.unwrap().unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert!(handle.poll_request().is_pending(), "no second replay");
    assert_eq!(source.fetches(), 2);
}

#[tokio::test]
async fn streaming_body_is_not_replayed_but_the_token_is_dropped() {
    let (source, cache) = fake_cache();
    let (mut service, mut handle) =
        mocked::<ReplayBody<Body>, _>(BearerTokenLayer::new(cache.clone()));

    let req = Request::post("http://upstream.test/upload")
        .body(ReplayBody::streaming(Full::new(Bytes::from_static(
            b"stream",
        ))))
        .unwrap();
    let call = spawn_call(&mut service, req).await;
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(status(StatusCode::UNAUTHORIZED));

    assert_eq!(
        call.await.unwrap().unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert!(handle.poll_request().is_pending(), "no replay");
    assert_eq!(source.fetches(), 1);
    assert_eq!(cache.stats().invalidations, 1);

    // The next request fetches a new token: that is the only refresh.
    let req = Request::post("http://upstream.test/upload")
        .body(ReplayBody::buffered("again"))
        .unwrap();
    let call = spawn_call(&mut service, req).await;
    let (seen, reply) = handle.next_request().await.unwrap();
    assert_eq!(seen.headers()[AUTHORIZATION], "Bearer fake-1");
    reply.send_response(status(StatusCode::OK));
    call.await.unwrap().unwrap();
    assert_eq!(source.fetches(), 2);
}

#[tokio::test]
async fn retry_off_hands_back_the_401_and_drops_the_token() {
    let (source, cache) = fake_cache();
    let layer = BearerTokenLayer::new(cache.clone()).retry_on_unauthorized(false);
    let (mut service, mut handle) = mocked::<Body, _>(layer);

    let call = spawn_call(&mut service, request("{}")).await;
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(status(StatusCode::UNAUTHORIZED));
    assert_eq!(
        call.await.unwrap().unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert!(handle.poll_request().is_pending(), "no replay");
    assert_eq!(source.fetches(), 1);
    assert_eq!(cache.stats().invalidations, 1);
}

/// An upstream that answers `401` to every request for a minute: the
/// cache's forced-refresh budget holds the token source to a handful of
/// fetches, and beyond it each `401` goes back to the caller unchanged
/// without a replay.
#[tokio::test(start_paused = true)]
async fn an_upstream_rejecting_everything_for_a_minute_costs_at_most_five_fetches() {
    let (source, cache) = fake_cache();
    let upstream_calls = Arc::new(AtomicU64::new(0));
    let seen_tokens = Arc::new(Mutex::new(Vec::<String>::new()));
    let inner = {
        let (calls, seen) = (upstream_calls.clone(), seen_tokens.clone());
        tower::service_fn(move |request: Request<Body>| {
            calls.fetch_add(1, Ordering::SeqCst);
            let token = request.headers()[AUTHORIZATION]
                .to_str()
                .unwrap()
                .to_owned();
            seen.lock().unwrap().push(token);
            let mut response = Response::new(Body::from("rejected"));
            *response.status_mut() = StatusCode::UNAUTHORIZED;
            async move { Ok::<_, std::convert::Infallible>(response) }
        })
    };
    let mut service = BearerTokenLayer::new(cache.clone()).layer(inner);
    let start = tokio::time::Instant::now();
    let mut requests = 0u64;
    while start.elapsed() < Duration::from_secs(60) {
        let response = service
            .ready()
            .await
            .unwrap()
            .call(request("{}"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(body_bytes(response.into_body()).await, "rejected");
        requests += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(requests, 1200);
    let fetches = source.fetches();
    assert!(fetches <= 5, "{fetches} token fetches");
    // The first token plus the default budget of three forced refreshes.
    assert_eq!(fetches, 4);
    // One replay per forced refresh, none beyond the budget.
    assert_eq!(upstream_calls.load(Ordering::SeqCst), requests + 3);
    assert_eq!(cache.stats().forced_refreshes_limited, requests - 3);
    // Every token reached the upstream; none after it was dropped.
    let seen = seen_tokens.lock().unwrap().clone();
    for n in 0..3 {
        let token = format!("Bearer fake-{n}");
        let last = seen.iter().rposition(|t| *t == token).unwrap();
        let next = format!("Bearer fake-{}", n + 1);
        assert!(
            seen[..last].iter().all(|t| *t != next),
            "{token} after {next}"
        );
    }
}

// === token failures ===

#[tokio::test]
async fn token_failure_is_typed_and_answers_503() {
    let (source, cache) = fake_cache();
    source.fail_with(ServiceErrorKind::InvalidGrant);
    let (mut service, mut handle) = mocked::<Body, _>(BearerTokenLayer::new(cache));

    let call = spawn_call(&mut service, request("{}")).await;
    let err = call.await.unwrap().unwrap_err();
    assert!(
        handle.poll_request().is_pending(),
        "nothing sent without a token"
    );
    let unavailable = err.token_unavailable().expect("a token error");
    assert_eq!(unavailable.kind(), "InvalidGrant");
    assert_eq!(unavailable.class(), ErrorClass::Fatal);
    assert!(unavailable.retry_after > Duration::ZERO);
    assert!(err.inner().is_none());
    // Boxed at a boundary, the token error can be downcast.
    let boxed = err.into_boxed();
    let downcast = boxed
        .downcast_ref::<TokenUnavailable>()
        .expect("a TokenUnavailable");
    assert_eq!(downcast.kind(), "InvalidGrant");

    let response: Response<Body> = unavailable_response(downcast);
    assert_503(response, "InvalidGrant", downcast.retry_after).await;
}

#[tokio::test]
async fn retry_after_is_whole_seconds_rounded_up() {
    for (delay, expected) in [(0, "1"), (1, "1"), (1000, "1"), (1500, "2"), (30_000, "30")] {
        let err = TokenUnavailable::new(
            TokenError::NoRefreshToken("nothing configured".into()),
            Duration::from_millis(delay),
        );
        let response: Response<Body> = unavailable_response(&err);
        assert_eq!(response.headers()["retry-after"], expected, "{delay} ms");
    }
}

async fn assert_503(response: Response<Body>, kind: &str, retry_after: Duration) {
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["content-type"], "application/json");
    let secs: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        secs >= 1 && secs >= retry_after.as_secs(),
        "{secs} vs {retry_after:?}"
    );
    let body: Value = serde_json::from_slice(&body_bytes(response.into_body()).await).unwrap();
    assert_eq!(body["error"], "token_unavailable");
    assert_eq!(body["kind"], kind);
    assert!(body["message"].as_str().unwrap().contains(kind), "{body}");
}

// === ReplayBody ===

#[tokio::test]
async fn replay_body_buffered_replays_and_streaming_does_not() {
    let buffered: ReplayBody<Body> = ReplayBody::buffered("abc");
    assert!(buffered.is_replayable());
    assert_eq!(http_body::Body::size_hint(&buffered).exact(), Some(3));
    let copy = buffered.try_clone().unwrap();
    assert_eq!(body_bytes(buffered).await, "abc");
    assert_eq!(body_bytes(copy).await, "abc");

    let streaming: ReplayBody<Body> = ReplayBody::streaming(Full::new(Bytes::from_static(b"xyz")));
    assert!(!streaming.is_replayable());
    assert!(streaming.try_clone().is_none());
    assert_eq!(body_bytes(streaming).await, "xyz");

    assert!(Full::new(Bytes::from_static(b"x")).try_clone().is_some());
    assert!(().try_clone().is_some());
    assert!(String::from("s").try_clone().is_some());
}

// === tracing ===

/// Everything the crate logs, from every test in this binary.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// Installs one global TRACE subscriber that captures the crate's logs.
/// Every test calls this before touching the layer: a callsite first hit
/// on another thread while a scoped subscriber is being set can have its
/// interest cached as "never", so a per-test subscriber would be flaky.
fn logs() -> &'static Captured {
    static LOGS: OnceLock<Captured> = OnceLock::new();
    LOGS.get_or_init(|| {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "sso_token_proxy=trace,layer=info",
            ))
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
        captured
    })
}

#[tokio::test]
async fn traces_cache_status_and_outcome_but_never_the_token() {
    let (_source, cache) = fake_cache();
    let (mut service, mut handle) = mocked::<Body, _>(BearerTokenLayer::new(cache));
    // Marks this test's lines among those of the tests running beside it.
    let scope = tracing::info_span!("layer_tracing_test");
    for code in [
        StatusCode::OK,
        StatusCode::OK,
        StatusCode::UNAUTHORIZED,
        StatusCode::OK,
    ] {
        let future = {
            let ready = service.ready().await.unwrap();
            let _entered = scope.enter();
            ready.call(request("{}"))
        };
        let call = tokio::spawn(future.instrument(scope.clone()));
        let (_, reply) = handle.next_request().await.unwrap();
        reply.send_response(status(code));
        if code == StatusCode::UNAUTHORIZED {
            let (_, reply) = handle.next_request().await.unwrap();
            reply.send_response(status(StatusCode::OK));
        }
        call.await.unwrap().unwrap();
    }

    let all = logs().text();
    let ours: Vec<&str> = all
        .lines()
        .filter(|line| line.contains("layer_tracing_test"))
        .collect();
    let has = |needle: &str| ours.iter().any(|line| line.contains(needle));
    assert!(
        has(r#"token_acquisition{cache="miss" outcome="ok"}"#),
        "{ours:#?}"
    );
    assert!(
        has(r#"token_acquisition{cache="hit" outcome="ok""#),
        "{ours:#?}"
    );
    assert!(has(r#"trigger="unauthorized" outcome="ok""#), "{ours:#?}");
    assert!(has("upstream answered 401"), "{ours:#?}");
    // No test's token shows up in any test's logs.
    assert!(!all.contains("fake-"), "a token leaked:\n{all}");
}

// === against the emulator ===

struct Upstream {
    emulator: EmulatorHandle,
    cache: TokenCache,
    client: Client<HttpConnector, ReplayBody<Body>>,
}

impl Upstream {
    async fn start() -> Self {
        logs();
        let client_id = "layer-test-client".to_owned();
        let client_secret = Secret::new("layer-test-secret");
        let refresh_token = Secret::new("layer-test-refresh");
        let emulator = Emulator::start(EmulatorConfig {
            clients: vec![SeedClient {
                client_id: client_id.clone(),
                client_secret: client_secret.clone(),
                refresh_tokens: vec![refresh_token.clone()],
                scopes: Vec::new(),
            }],
            ..EmulatorConfig::default()
        })
        .await
        .unwrap();
        let oidc = OidcClient::builder()
            .endpoint(emulator.url())
            .build()
            .unwrap();
        let source = RefreshTokenSource::builder(oidc, client_id, client_secret, refresh_token)
            .build()
            .unwrap();
        let cache = TokenCache::new(source, CacheOptions::default());
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self {
            emulator,
            cache,
            client,
        }
    }

    fn service(&self) -> BearerTokenService<Client<HttpConnector, ReplayBody<Body>>> {
        BearerTokenLayer::new(self.cache.clone()).layer(self.client.clone())
    }

    fn get(&self, path: &str, body: ReplayBody<Body>) -> Request<ReplayBody<Body>> {
        Request::post(format!("{}{path}", self.emulator.url()))
            .body(body)
            .unwrap()
    }

    fn create_token_calls(&self) -> u64 {
        self.emulator.counters().create_token
    }
}

#[tokio::test]
async fn emulator_401_means_one_refresh_and_one_replay() {
    let up = Upstream::start().await;
    let service = up.service();

    let response = service
        .clone()
        .oneshot(up.get("/warm", ReplayBody::empty()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let before = up.emulator.counters();
    assert_eq!(before.create_token, 1);

    up.emulator.revoke_access_tokens();
    let response = service
        .clone()
        .oneshot(up.get("/echo", ReplayBody::buffered("hello")))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let echo: Value = serde_json::from_slice(&body_bytes(response.into_body()).await).unwrap();
    assert_eq!(
        echo["body_length"], 5,
        "the replay carried the whole body: {echo}"
    );

    let after = up.emulator.counters();
    assert_eq!(after.create_token - before.create_token, 1);
    assert_eq!(after.echo_unauthorized - before.echo_unauthorized, 1);
    assert_eq!(after.echo_authorized - before.echo_authorized, 1);
    up.emulator.shutdown().await;
}

#[tokio::test]
async fn emulator_streaming_401_passes_through_without_refresh() {
    let up = Upstream::start().await;
    let service = up.service();
    service
        .clone()
        .oneshot(up.get("/warm", ReplayBody::empty()))
        .await
        .unwrap();

    up.emulator.revoke_access_tokens();
    let before = up.emulator.counters();
    let streaming = ReplayBody::streaming(Full::new(Bytes::from_static(b"streamed")));
    let response = service
        .clone()
        .oneshot(up.get("/upload", streaming))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let after = up.emulator.counters();
    assert_eq!(
        after.create_token, before.create_token,
        "no refresh for a request that is not replayed"
    );
    assert_eq!(after.echo_unauthorized - before.echo_unauthorized, 1);

    // The rejected token is gone: the next request gets a fresh one.
    let response = service
        .clone()
        .oneshot(up.get("/next", ReplayBody::empty()))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(up.create_token_calls() - before.create_token, 1);
    up.emulator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_hundred_concurrent_401s_cause_one_refresh() {
    let up = Upstream::start().await;
    let service = up.service();
    service
        .clone()
        .oneshot(up.get("/warm", ReplayBody::empty()))
        .await
        .unwrap();
    let old = up.cache.current().unwrap();

    up.emulator.revoke_access_tokens();
    let before = up.emulator.counters();
    let calls = (0..100).map(|i| {
        let request = up.get(
            &format!("/burst/{i}"),
            ReplayBody::buffered(format!("request {i}")),
        );
        tokio::spawn(service.clone().oneshot(request))
    });
    for result in join_all(calls).await {
        assert_eq!(result.unwrap().unwrap().status(), StatusCode::OK);
    }
    let after = up.emulator.counters();
    assert_eq!(after.create_token - before.create_token, 1);
    assert_eq!(after.echo_authorized - before.echo_authorized, 100);
    assert_ne!(up.cache.current().unwrap().id(), old.id());
    up.emulator.shutdown().await;
}

#[tokio::test]
async fn emulator_invalid_grant_answers_a_typed_error_and_503() {
    let up = Upstream::start().await;
    up.emulator.inject(
        Operation::CreateToken,
        [Fault::Error(ServiceErrorKind::InvalidGrant)],
    );

    let err = up
        .service()
        .oneshot(up.get("/anything", ReplayBody::empty()))
        .await
        .unwrap_err();
    let BearerTokenError::Token(unavailable) = &err else {
        panic!("expected a token error, got {err:?}");
    };
    // The cause is on the source chain.
    let cause = std::error::Error::source(&err).expect("a source");
    assert!(
        cause.downcast_ref::<TokenUnavailable>().is_some(),
        "{cause}"
    );
    assert_eq!(unavailable.kind(), "InvalidGrant");
    assert_eq!(unavailable.class(), ErrorClass::Fatal);
    let counters = up.emulator.counters();
    assert_eq!(counters.create_token, 1, "a fatal error is not retried");
    assert_eq!(
        counters.echo_authorized + counters.echo_unauthorized,
        0,
        "nothing sent upstream"
    );

    assert_503(
        unavailable_response(unavailable),
        "InvalidGrant",
        unavailable.retry_after,
    )
    .await;
    up.emulator.shutdown().await;
}
