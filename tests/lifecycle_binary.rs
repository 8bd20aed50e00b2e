//! Token lifecycle through the real `sso-token-proxy` binary against an
//! in-process emulator: 401-driven refreshes are bounded (issue 12), and
//! the lifecycle guarantees of issue 13.
//!
//! Every test has its own emulator on 127.0.0.1:0, its own temp dir and
//! ports, and bounds every wait.

#[allow(dead_code)]
#[path = "support/binary_harness.rs"]
mod harness;

use std::time::Duration;

use http::{Request, StatusCode};
use sso_token_proxy::emulator::EmulatorConfig;
use tokio::time::timeout;

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
