//! Per-caller token exchange on real sockets: an in-process proxy whose
//! route exchanges each caller's JWT with `CreateTokenWithIAM` at the
//! emulator (SigV4-verified, JWTs checked against its test issuer), and a
//! recording upstream, so what the upstream received is asserted: whose
//! token each request carried (the emulator encodes the subject in the
//! tokens it issues) and that the caller's own token never arrived.
//!
//! Run with `cargo test --test exchange`.

#[path = "support/proxy_harness.rs"]
#[allow(dead_code)] // Shared with tests/proxy.rs, which uses other parts.
mod harness;

use std::time::Duration;

use bytes::Bytes;
use harness::Upstream;
use http::{HeaderName, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use sso_token_proxy::{
    CallerOptions, CallerTokens, OidcClient, Secret,
    cache::{CacheOptions, TokenCache},
    emulator::{
        DEFAULT_APPLICATION_ARN, DEFAULT_AUDIENCE, Emulator, EmulatorApplication, EmulatorConfig,
        EmulatorHandle, TEST_ACCESS_KEY_ID, TEST_SECRET_ACCESS_KEY, token_subject,
    },
    oidc::{AwsCredentials, GRANT_TOKEN_EXCHANGE, SigV4Signer, TOKEN_TYPE_ACCESS_TOKEN},
    proxy::{Proxy, Route},
    token::{CallerGrant, IamCallerExchange, IamExchange, IamGrant, Reuse, Token, TokenSource},
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

/// Per request; generous, the machine is shared.
const LIMIT: Duration = Duration::from_secs(60);

fn signing_client(emulator: &EmulatorHandle) -> OidcClient {
    OidcClient::builder()
        .endpoint(emulator.url())
        .sigv4(SigV4Signer::new(
            AwsCredentials::fixed(
                TEST_ACCESS_KEY_ID,
                &Secret::new(TEST_SECRET_ACCESS_KEY),
                None,
            ),
            "us-east-1",
        ))
        .call_timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A source the per-caller route must never use.
struct Unused;

impl TokenSource for Unused {
    fn identity(&self) -> String {
        "unused".into()
    }
    fn scopes(&self) -> &[String] {
        &[]
    }
    fn fetch(&self, _reuse: Reuse) -> sso_token_proxy::token::FetchFuture<'_> {
        Box::pin(async {
            Ok(Token::new(
                Secret::new("the-shared-token"),
                Duration::from_secs(3600),
            ))
        })
    }
}

/// A proxy with one per-caller route to `upstream`, served in-process.
struct Served {
    addr: std::net::SocketAddr,
    callers: CallerTokens,
    _stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    emulator: &EmulatorHandle,
    upstream: &Upstream,
    inbound: HeaderName,
    options: CallerOptions,
) -> Served {
    serve_grant(
        emulator,
        upstream,
        inbound,
        options,
        DEFAULT_APPLICATION_ARN,
        CallerGrant::JwtBearer,
    )
    .await
}

/// [`serve`] exchanging at `application_arn` with `grant`.
async fn serve_grant(
    emulator: &EmulatorHandle,
    upstream: &Upstream,
    inbound: HeaderName,
    options: CallerOptions,
    application_arn: &str,
    grant: CallerGrant,
) -> Served {
    let exchange = IamExchange::new(signing_client(emulator), application_arn);
    let callers = CallerTokens::new(IamCallerExchange::new(exchange, grant), options);
    let unused = TokenCache::new(Unused, CacheOptions::default());
    let route = Route::new("callers", upstream.url().parse().unwrap(), unused)
        .per_caller(callers.clone(), inbound);
    let config = harness::proxy_config(&upstream.url());
    let proxy = Proxy::with_routes(&config, vec![route]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(proxy.serve(listener, async move {
        let _ = stopped.await;
    }));
    Served {
        addr,
        callers,
        _stop: stop,
        task,
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET `path` with `headers`; the status and the body.
async fn get(
    client: &HttpClient,
    served: &Served,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut request = Request::get(format!("http://{}{path}", served.addr));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(Bytes::new())).unwrap();
    let response = tokio::time::timeout(LIMIT, client.request(request))
        .await
        .expect("an answer in time")
        .expect("an answer");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn emulator() -> EmulatorHandle {
    Emulator::start(EmulatorConfig::default()).await.unwrap()
}

/// The subject of the emulator-issued token in an `Authorization` value.
fn subject_of(authorization: Option<&str>) -> Option<String> {
    token_subject(authorization?.strip_prefix("Bearer ")?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_callers_ten_requests_each_make_a_thousand_exchanges_and_keep_their_tokens() {
    let emulator = emulator().await;
    let upstream = Upstream::start().await;
    let served = serve(
        &emulator,
        &upstream,
        header::AUTHORIZATION,
        CallerOptions::default(),
    )
    .await;
    let client = client();
    let callers: Vec<(String, Secret)> = (0..1000)
        .map(|i| {
            let subject = format!("user-{i}");
            let jwt = emulator.mint_assertion(&subject, Duration::from_secs(3600));
            (subject, jwt)
        })
        .collect();
    // Fifty callers at a time, each with ten concurrent requests.
    for wave in callers.chunks(50) {
        let mut tasks = Vec::new();
        for (subject, jwt) in wave {
            for n in 0..10 {
                let (client, path) = (client.clone(), format!("/c/{subject}/{n}"));
                let auth = format!("Bearer {}", jwt.expose());
                let addr = served.addr;
                tasks.push(tokio::spawn(async move {
                    let request = Request::get(format!("http://{addr}{path}"))
                        .header(header::AUTHORIZATION, auth)
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    let response = tokio::time::timeout(LIMIT, client.request(request))
                        .await
                        .expect("an answer in time")
                        .expect("an answer");
                    response.status()
                }));
            }
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), StatusCode::OK);
        }
    }
    let counters = emulator.counters();
    assert_eq!(counters.create_token_with_iam, 1000, "{counters:?}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 10_000);
    for request in &seen {
        let subject = request.uri.split('/').nth(2).unwrap();
        assert_eq!(
            subject_of(request.header("authorization")).as_deref(),
            Some(subject),
            "request {} carried another caller's token",
            request.uri
        );
    }
    // No caller's JWT reached the upstream.
    let received = String::from_utf8_lossy(&upstream.received_bytes()).into_owned();
    for (_, jwt) in callers.iter().step_by(37) {
        assert!(!received.contains(jwt.expose()));
    }
    served.callers.run_pending_tasks().await;
    assert_eq!(served.callers.entry_count(), 1000);
}

#[tokio::test]
async fn the_inbound_header_never_reaches_the_upstream() {
    let emulator = emulator().await;
    let upstream = Upstream::start().await;
    let served = serve(
        &emulator,
        &upstream,
        HeaderName::from_static("x-caller-token"),
        CallerOptions::default(),
    )
    .await;
    let client = client();
    let jwt = emulator.mint_assertion("alice", Duration::from_secs(3600));
    for value in [jwt.expose().to_owned(), format!("bearer {}", jwt.expose())] {
        let (status, _) = get(
            &client,
            &served,
            "/x",
            &[
                ("x-caller-token", &value),
                ("authorization", "Bearer client-sent-this"),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    for request in &seen {
        assert_eq!(request.header("x-caller-token"), None);
        assert_eq!(request.all("authorization").len(), 1);
        assert_eq!(
            subject_of(request.header("authorization")).as_deref(),
            Some("alice")
        );
    }
    let received = String::from_utf8_lossy(&upstream.received_bytes()).into_owned();
    assert!(!received.contains(jwt.expose()));
    assert!(!received.contains("client-sent-this"));
    assert!(!received.to_ascii_lowercase().contains("x-caller-token"));
    assert_eq!(emulator.counters().create_token_with_iam, 1);
}

#[tokio::test]
async fn without_a_caller_token_the_answer_is_401_and_nothing_is_exchanged_or_forwarded() {
    let emulator = emulator().await;
    let upstream = Upstream::start().await;
    let served = serve(
        &emulator,
        &upstream,
        header::AUTHORIZATION,
        CallerOptions::default(),
    )
    .await;
    let client = client();
    let jwt = emulator.mint_assertion("bob", Duration::from_secs(3600));
    let two = format!("Bearer {}", jwt.expose());
    let cases: [&[(&str, &str)]; 4] = [
        &[],
        &[("authorization", "Bearer ")],
        &[("authorization", "Bearer")],
        // Two tokens: whose would it be?
        &[("authorization", &two), ("authorization", &two)],
    ];
    for headers in cases {
        let (status, body) = get(&client, &served, "/x", headers).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{headers:?}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["error"], "missing_caller_token");
        assert!(!body.contains(jwt.expose()));
    }
    assert_eq!(emulator.counters().create_token_with_iam, 0);
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn a_caller_with_an_expired_assertion_gets_401_and_one_exchange_per_failure_ttl() {
    let emulator = emulator().await;
    let upstream = Upstream::start().await;
    let served = serve(
        &emulator,
        &upstream,
        header::AUTHORIZATION,
        CallerOptions {
            // Longer than the test: every request falls in one window.
            failure_ttl: Duration::from_secs(3600),
            ..Default::default()
        },
    )
    .await;
    let client = client();
    let expired =
        emulator.mint_assertion_with("carol", DEFAULT_AUDIENCE, Duration::from_secs(60), true);
    let auth = format!("Bearer {}", expired.expose());
    for _ in 0..25 {
        let (status, body) = get(&client, &served, "/x", &[("authorization", &auth)]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["error"], "caller_token_refused", "{body}");
        assert!(!body.contains(expired.expose()));
    }
    assert_eq!(emulator.counters().create_token_with_iam, 1);
    assert!(upstream.seen().is_empty());
    // A good caller is served meanwhile.
    let good = emulator.mint_assertion("dave", Duration::from_secs(3600));
    let (status, _) = get(
        &client,
        &served,
        "/x",
        &[("authorization", &format!("Bearer {}", good.expose()))],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        subject_of(upstream.seen()[0].header("authorization")).as_deref(),
        Some("dave")
    );
}

#[tokio::test]
async fn a_caller_refused_with_access_denied_gets_403_json_and_one_exchange_per_failure_ttl() {
    let emulator = emulator().await;
    emulator.deny_user("mallory");
    let upstream = Upstream::start().await;
    let served = serve(
        &emulator,
        &upstream,
        header::AUTHORIZATION,
        CallerOptions {
            // Longer than the test: every request falls in one window.
            failure_ttl: Duration::from_secs(3600),
            ..Default::default()
        },
    )
    .await;
    let client = client();
    let jwt = emulator.mint_assertion("mallory", Duration::from_secs(3600));
    let auth = format!("Bearer {}", jwt.expose());
    for _ in 0..20 {
        let (status, body) = get(&client, &served, "/x", &[("authorization", &auth)]).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["error"], "caller_token_refused", "{body}");
        assert_eq!(json["kind"], "AccessDenied", "{body}");
        assert!(!body.contains(jwt.expose()));
    }
    let counters = emulator.counters();
    assert_eq!(counters.create_token_with_iam, 1, "{counters:?}");
    assert_eq!(counters.errors_by_kind.get("AccessDenied"), Some(&1));
    assert!(upstream.seen().is_empty());
    // Another caller is served meanwhile, with its own token.
    let good = emulator.mint_assertion("erin", Duration::from_secs(3600));
    let (status, _) = get(
        &client,
        &served,
        "/x",
        &[("authorization", &format!("Bearer {}", good.expose()))],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        subject_of(upstream.seen()[0].header("authorization")).as_deref(),
        Some("erin")
    );
}

/// A second application: token exchange needs a token issued to another.
const OTHER_APPLICATION_ARN: &str =
    "arn:aws:sso::111122223333:application/ssoins-1111111111111111/apl-2222222222222222";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_exchange_route_forwards_the_exchanged_token_of_each_callers_subject() {
    let emulator = emulator().await;
    emulator.add_application(EmulatorApplication {
        arn: OTHER_APPLICATION_ARN.to_owned(),
        audiences: Vec::new(),
        scopes: Vec::new(),
    });
    let upstream = Upstream::start().await;
    // The callers hold Identity Center tokens of the default application
    // (as an app that signed them in would); the route exchanges them for
    // tokens of the other one.
    let front = IamExchange::new(signing_client(&emulator), DEFAULT_APPLICATION_ARN);
    let mut held = Vec::new();
    for subject in ["alice", "bob", "carol"] {
        let jwt = emulator.mint_assertion(subject, Duration::from_secs(3600));
        let token = front.exchange(IamGrant::jwt_bearer(jwt)).await.unwrap();
        held.push((subject, token.access_token().expose().to_owned()));
    }
    let served = serve_grant(
        &emulator,
        &upstream,
        header::AUTHORIZATION,
        CallerOptions::default(),
        OTHER_APPLICATION_ARN,
        CallerGrant::TokenExchange {
            subject_token_type: TOKEN_TYPE_ACCESS_TOKEN.to_owned(),
        },
    )
    .await;
    let client = client();
    let mut tasks = Vec::new();
    for (subject, token) in &held {
        for n in 0..5 {
            let (client, addr) = (client.clone(), served.addr);
            let (path, auth) = (format!("/c/{subject}/{n}"), format!("Bearer {token}"));
            tasks.push(tokio::spawn(async move {
                let request = Request::get(format!("http://{addr}{path}"))
                    .header(header::AUTHORIZATION, auth)
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let response = tokio::time::timeout(LIMIT, client.request(request))
                    .await
                    .expect("an answer in time")
                    .expect("an answer");
                response.status()
            }));
        }
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 15);
    for request in &seen {
        let subject = request.uri.split('/').nth(2).unwrap();
        let sent = request.header("authorization").unwrap();
        assert_eq!(subject_of(Some(sent)).as_deref(), Some(subject));
        // A token of the other application, not the caller's own.
        let (_, inbound) = held.iter().find(|(s, _)| *s == subject).unwrap();
        assert_ne!(sent.strip_prefix("Bearer "), Some(inbound.as_str()));
    }
    let received = String::from_utf8_lossy(&upstream.received_bytes()).into_owned();
    for (_, inbound) in &held {
        assert!(!received.contains(inbound.as_str()));
    }
    let counters = emulator.counters();
    assert_eq!(
        counters
            .create_token_with_iam_by_grant
            .get(GRANT_TOKEN_EXCHANGE),
        Some(&3),
        "one exchange per caller: {counters:?}"
    );
}

/// Sends `request` and reads the answer: status and body.
async fn send(client: &HttpClient, request: Request<Full<Bytes>>) -> (StatusCode, String) {
    let response = tokio::time::timeout(LIMIT, client.request(request))
        .await
        .expect("an answer in time")
        .expect("an answer");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_401_exchanges_that_callers_token_again_once_and_replays() {
    let emulator = emulator().await;
    let upstream = Upstream::start().await;
    let served = serve(
        &emulator,
        &upstream,
        header::AUTHORIZATION,
        CallerOptions::default(),
    )
    .await;
    let client = client();
    let alice = format!(
        "Bearer {}",
        emulator
            .mint_assertion("alice", Duration::from_secs(3600))
            .expose()
    );
    let bob = format!(
        "Bearer {}",
        emulator
            .mint_assertion("bob", Duration::from_secs(3600))
            .expose()
    );
    for auth in [&alice, &bob] {
        let (status, _) = get(&client, &served, "/x", &[("authorization", auth)]).await;
        assert_eq!(status, StatusCode::OK);
    }
    let first = upstream.seen()[0]
        .header("authorization")
        .unwrap()
        .to_owned();
    let bobs = upstream.seen()[1]
        .header("authorization")
        .unwrap()
        .to_owned();
    assert_eq!(subject_of(Some(&first)).as_deref(), Some("alice"));
    assert_eq!(emulator.counters().create_token_with_iam, 2);

    // The upstream stops accepting alice's token: twenty concurrent POSTs
    // with small bodies each get a 401, one new exchange, and a replay.
    upstream.reject(&first);
    let mut tasks = Vec::new();
    for n in 0..20 {
        let (client, addr, auth) = (client.clone(), served.addr, alice.clone());
        tasks.push(tokio::spawn(async move {
            let request = Request::post(format!("http://{addr}/post/{n}"))
                .header(header::AUTHORIZATION, auth)
                .body(Full::new(Bytes::from(format!("payload {n}"))))
                .unwrap();
            send(&client, request).await
        }));
    }
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert_eq!(emulator.counters().create_token_with_iam, 3);
    let seen = upstream.seen();
    let posts: Vec<_> = seen.iter().filter(|r| r.method == "POST").collect();
    let second = posts
        .iter()
        .map(|r| r.header("authorization").unwrap())
        .find(|a| *a != first)
        .expect("a replay with a new token")
        .to_owned();
    assert_eq!(subject_of(Some(&second)).as_deref(), Some("alice"));
    for n in 0..20 {
        let path = format!("/post/{n}");
        let sent: Vec<_> = posts.iter().filter(|r| r.uri == path).collect();
        // Its last arrival is the one answered 200: with the new token,
        // the same body.
        let last = sent.last().unwrap();
        assert_eq!(last.header("authorization"), Some(second.as_str()));
        assert_eq!(last.body_len, format!("payload {n}").len() as u64);
        assert!(sent.len() <= 2, "{path} sent {} times", sent.len());
        assert!(sent.iter().all(|r| r.body_sha256 == last.body_sha256));
    }
    // Bob's token was not touched.
    let (status, _) = get(&client, &served, "/y", &[("authorization", &bob)]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        upstream.seen().last().unwrap().header("authorization"),
        Some(bobs.as_str())
    );

    // Alice's new token is refused too, within the minute: the 401 goes
    // back, the token is kept, no exchange per request.
    upstream.reject(&second);
    for _ in 0..10 {
        let (status, body) = get(&client, &served, "/z", &[("authorization", &alice)]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body, "rejected", "the upstream's own 401");
    }
    assert_eq!(emulator.counters().create_token_with_iam, 3);
    let alices_last: Vec<_> = upstream
        .seen()
        .into_iter()
        .filter(|r| r.uri == "/z")
        .collect();
    assert_eq!(alices_last.len(), 10, "each sent once, not replayed");
    assert!(
        alices_last
            .iter()
            .all(|r| r.header("authorization") == Some(second.as_str()))
    );
    let received = String::from_utf8_lossy(&upstream.received_bytes()).into_owned();
    assert!(!received.contains(alice.strip_prefix("Bearer ").unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_rejecting_everything_costs_one_extra_exchange_per_caller() {
    let emulator = emulator().await;
    let upstream = Upstream::start().await;
    upstream.reject_all();
    let served = serve(
        &emulator,
        &upstream,
        header::AUTHORIZATION,
        CallerOptions::default(),
    )
    .await;
    let client = client();
    for caller in 0..5 {
        let jwt = emulator.mint_assertion(&format!("user-{caller}"), Duration::from_secs(3600));
        let auth = format!("Bearer {}", jwt.expose());
        for _ in 0..10 {
            let (status, _) = get(&client, &served, "/x", &[("authorization", &auth)]).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
        }
    }
    // Per caller: its exchange, one more for the first 401, none after.
    assert_eq!(emulator.counters().create_token_with_iam, 10);
    // The first request of each went twice (the replay), the others once.
    assert_eq!(upstream.seen().len(), 5 * 11);
}

#[tokio::test]
async fn a_streamed_request_gets_the_401_and_the_next_request_a_new_token() {
    let emulator = emulator().await;
    let upstream = Upstream::start().await;
    let served = serve(
        &emulator,
        &upstream,
        header::AUTHORIZATION,
        CallerOptions::default(),
    )
    .await;
    let client = client();
    let jwt = emulator.mint_assertion("carol", Duration::from_secs(3600));
    let auth = format!("Bearer {}", jwt.expose());
    let (status, _) = get(&client, &served, "/a", &[("authorization", &auth)]).await;
    assert_eq!(status, StatusCode::OK);
    let first = upstream.seen()[0]
        .header("authorization")
        .unwrap()
        .to_owned();
    upstream.reject(&first);
    // A body of unknown length is streamed, so it cannot be sent again.
    let raw = format!(
        "POST /b HTTP/1.1\r\nhost: x\r\nauthorization: {auth}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let response = harness::raw(served.addr, &raw).await;
    assert_eq!(response.status, 401);
    assert_eq!(upstream.seen().iter().filter(|r| r.uri == "/b").count(), 1);
    // The caller's token is exchanged again meanwhile; the next request
    // carries the new one.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while emulator.counters().create_token_with_iam < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no new exchange");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = get(&client, &served, "/c", &[("authorization", &auth)]).await;
    assert_eq!(status, StatusCode::OK);
    let last = upstream
        .seen()
        .last()
        .unwrap()
        .header("authorization")
        .unwrap()
        .to_owned();
    assert_ne!(last, first);
    assert_eq!(subject_of(Some(&last)).as_deref(), Some("carol"));
    assert_eq!(emulator.counters().create_token_with_iam, 2);
}
