//! Token lifecycle through the real `sso-token-proxy` binary against an
//! in-process emulator: 401-driven refreshes are bounded (issue 12), and
//! the lifecycle guarantees of issue 13.
//!
//! Every test has its own emulator on 127.0.0.1:0, its own temp dir and
//! ports, and bounds every wait.

#[allow(dead_code)]
#[path = "support/binary_harness.rs"]
mod harness;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use http::{Request, StatusCode};
use sso_token_proxy::emulator::EmulatorConfig;
use tokio::time::{Instant, timeout};

use harness::{Env, Http, Opts, full};

/// The test's overall limit.
const LIMIT: Duration = Duration::from_secs(60);

async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    timeout(LIMIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: test did not finish within {LIMIT:?}"))
}

/// `/metrics`, parsed.
async fn scrape(http: &Http, url: &str) -> prometheus_parse::Scrape {
    let r = http.get(url).await;
    assert_eq!(r.status, StatusCode::OK);
    let text = String::from_utf8(r.body.to_vec()).expect("UTF-8 metrics");
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("Prometheus text")
}

/// The sum of the samples of `name` whose labels include `labels`.
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(x)
            | prometheus_parse::Value::Gauge(x)
            | prometheus_parse::Value::Untyped(x) => x,
            ref other => panic!("{name} is not a scalar: {other:?}"),
        })
        .sum()
}

/// Issue 12: a client that provokes `401`s (here the echo resource answers
/// with the status the request asks for, whatever the token) cannot make
/// the proxy call `CreateToken` once per request: three forced refreshes,
/// then every `401` passes through unchanged and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_provoking_401s_causes_three_refreshes_and_the_rest_are_counted() {
    bounded("provoked 401s", async {
        let env = Env::new(EmulatorConfig::default()).await;
        let proxy = env.start(Opts::default()).await;
        let http = Http::new();
        assert_eq!(http.get(&proxy.url("/warm")).await.status, StatusCode::OK);
        let before = env.emulator.counters();

        for i in 0..50 {
            let r = http
                .send(
                    Request::post(proxy.url(&format!("/provoke/{i}")))
                        .header("x-echo-status", "401")
                        .body(full(&b"replayable"[..]))
                        .unwrap(),
                )
                .await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "request {i}");
            assert_eq!(
                r.json()["path"],
                format!("/provoke/{i}"),
                "the upstream's own 401"
            );
        }
        let after = env.emulator.counters();
        assert_eq!(
            after.create_token,
            before.create_token + 3,
            "{before:?} -> {after:?}"
        );
        // Each request reached the upstream once, plus three replays.
        assert_eq!(after.echo_authorized, before.echo_authorized + 53);

        let metrics = scrape(&http, &proxy.admin_url("/metrics")).await;
        let forced = |decision| {
            sample(
                &metrics,
                "sso_token_proxy_forced_refreshes_total",
                &[("source", "default"), ("decision", decision)],
            )
        };
        assert_eq!(forced("allowed"), 3.0);
        assert_eq!(forced("limited"), 47.0);
        assert_eq!(forced("superseded"), 0.0);

        // The kept token still serves.
        assert_eq!(http.get(&proxy.url("/after")).await.status, StatusCode::OK);
        assert_eq!(env.emulator.counters().create_token, after.create_token);
    })
    .await;
}

/// Issue 13: the emulator issues 3 s tokens; with the default margins
/// (`expiry_margin` 10 s, `refresh_before_expiry` 5 min) the proxy scales
/// them to the token (0.75 s, 1.5 s) and serves 20 s of steady traffic
/// without one failed request, calling `CreateToken` about twice per token
/// lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_second_tokens_serve_twenty_seconds_without_a_failure() {
    const LIFETIME: Duration = Duration::from_secs(3);
    const RUN: Duration = Duration::from_secs(20);
    bounded("short-lived tokens", async {
        let env = Env::new(EmulatorConfig {
            access_token_lifetime: LIFETIME,
            ..Default::default()
        })
        .await;
        let proxy = env.start(Opts::default()).await;
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let started = Instant::now();
        let clients = (0..2).map(|c| {
            let (url, ok, failed) = (
                proxy.url(&format!("/steady/{c}")),
                ok.clone(),
                failed.clone(),
            );
            tokio::spawn(async move {
                let http = Http::new();
                while started.elapsed() < RUN {
                    let r = http.get(&url).await;
                    if r.status == StatusCode::OK {
                        ok.fetch_add(1, Ordering::SeqCst);
                    } else {
                        failed.fetch_add(1, Ordering::SeqCst);
                        eprintln!("{}: {}", r.status, String::from_utf8_lossy(&r.body));
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        });
        for client in clients.collect::<Vec<_>>() {
            client.await.unwrap();
        }
        let counters = env.emulator.counters();
        assert_eq!(failed.load(Ordering::SeqCst), 0, "{counters:?}");
        assert!(ok.load(Ordering::SeqCst) > 100);
        assert_eq!(
            counters.echo_unauthorized, 0,
            "no expired token reached the upstream"
        );
        let lifetimes = RUN.as_secs_f64() / LIFETIME.as_secs_f64();
        let calls = counters.create_token as f64;
        assert!(
            calls >= lifetimes && calls <= 2.0 * lifetimes + 2.0,
            "{calls} CreateToken calls in {lifetimes:.1} token lifetimes"
        );
        assert!(
            !proxy.stderr().contains("NoRefreshToken")
                && !proxy.stderr().contains("ExpiredOnArrival"),
            "{}",
            proxy.stderr()
        );
    })
    .await;
}

/// Issue 13: with `source = "sso_cache"` the cache file still lists the
/// token the upstream rejected as valid. Tokens are known by their value,
/// so the rejected token is never read back from the file: one
/// `CreateToken`, the replay succeeds, and the revoked token never reaches
/// the upstream again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sso_cache_token_rejected_upstream_is_never_sent_again() {
    bounded("sso_cache 401", async {
        let env = Env::new(EmulatorConfig::default()).await;
        let cache_file = env.path("sso-cache.json");
        let expired = serde_json::json!({
            "startUrl": "https://example.awsapps.com/start",
            "region": "us-east-1",
            "accessToken": "expired-token",
            "expiresAt": "2020-01-01T00:00:00Z",
            "clientId": env.client_id,
            "clientSecret": env.client_secret,
            "registrationExpiresAt": "2099-01-01T00:00:00Z",
            "refreshToken": env.refresh_token,
            "someFutureKey": {"kept": true},
        });
        std::fs::write(&cache_file, serde_json::to_vec_pretty(&expired).unwrap()).unwrap();
        let proxy = env
            .start(Opts {
                token_source: Some(format!(
                    "source = \"sso_cache\"\nsso_cache_file = \"{}\"",
                    cache_file.display()
                )),
                ..Opts::default()
            })
            .await;
        let http = Http::new();
        assert_eq!(http.get(&proxy.url("/first")).await.status, StatusCode::OK);
        let read_file = || -> serde_json::Value {
            serde_json::from_slice(&std::fs::read(&cache_file).unwrap()).unwrap()
        };
        let first_token = read_file()["accessToken"].as_str().unwrap().to_owned();
        let before = env.emulator.counters();
        assert_eq!(before.create_token, 1);

        env.emulator.revoke_access_tokens();
        assert!(
            env.emulator
                .is_refresh_token_live(read_file()["refreshToken"].as_str().unwrap()),
            "the file's refresh token still works"
        );
        let r = http
            .send(
                Request::post(proxy.url("/replayed"))
                    .body(full(&b"replayable"[..]))
                    .unwrap(),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        for i in 0..20 {
            let r = http.get(&proxy.url(&format!("/after/{i}"))).await;
            assert_eq!(
                r.status,
                StatusCode::OK,
                "{}",
                String::from_utf8_lossy(&r.body)
            );
        }
        let after = env.emulator.counters();
        assert_eq!(
            after.create_token,
            before.create_token + 1,
            "{before:?} -> {after:?}"
        );
        assert_eq!(
            after.echo_unauthorized,
            before.echo_unauthorized + 1,
            "the revoked token reached the upstream once: {before:?} -> {after:?}"
        );
        assert_eq!(after.echo_authorized, before.echo_authorized + 21);
        let file = read_file();
        assert_ne!(file["accessToken"], first_token.as_str());
        assert!(
            env.emulator
                .is_access_token_live(file["accessToken"].as_str().unwrap())
        );
        assert_eq!(file["someFutureKey"]["kept"], true);
    })
    .await;
}
