//! Cost of `BearerTokenLayer` on the cache-hit path, against tower-http's
//! `SetRequestHeaderLayer::overriding` with a static value: same inner
//! service, same request construction, same run.
//!
//! `cargo bench --bench layer -- --warm-up-time 1 --measurement-time 3`
//!
//! `per_caller_hit` is the per-caller path (`source = "exchange"`) on a
//! hit: hashing the caller's token, the lookup in the callers' cache and
//! the boxed future the proxy polls, next to the single-token layer.
//!
//! After Criterion's runs it prints the ratio of the figures Criterion
//! reported, then a paired ratio: short batches of the two services
//! alternated and the median of the per-pair ratios taken, which holds up
//! when other work on the machine comes and goes during the run.

use std::{
    convert::Infallible,
    fmt::Debug,
    hint::black_box,
    path::PathBuf,
    time::{Duration, Instant},
};

use criterion::Criterion;
use futures_util::FutureExt;
use http::{HeaderValue, Request, Response, header::AUTHORIZATION};
use sso_token_proxy::{
    CallerExchange, CallerOptions, CallerTokens, Secret,
    cache::{CacheOptions, TokenCache},
    layer::BearerTokenLayer,
    token::{FetchFuture, Reuse, Token, TokenSource},
};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_http::set_header::SetRequestHeaderLayer;

const GROUP: &str = "hit_path";
const BASELINE: &str = "set_request_header_static";
const LAYER: &str = "bearer_token_layer";
const LAYER_NO_RETRY: &str = "bearer_token_layer_no_retry";
const PER_CALLER_HIT: &str = "per_caller_hit";

/// The inbound token of the benchmark's one caller (a JWT's length).
const CALLER_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImJlbmNoIn0.eyJzdWIiOiJiZW5jaC1jYWxsZXIiLCJhdWQiOiJiZW5jaCJ9.c2lnbmF0dXJlLW9mLXRoZS1iZW5jaC1jYWxsZXItMDEyMzQ1Njc4OWFiY2RlZg";

/// Exchanges any caller's token for one long-lived token.
struct FixedExchange;

impl CallerExchange for FixedExchange {
    fn exchange(&self, _inbound: Secret) -> FetchFuture<'_> {
        Box::pin(async {
            Ok(Token::new(
                Secret::new(ACCESS_TOKEN),
                Duration::from_secs(24 * 3600),
            ))
        })
    }
}

/// One per-caller lookup as the proxy makes it: the caller's token taken
/// as a `Secret`, the lookup future boxed and polled once.
fn one_caller_lookup(callers: &CallerTokens) {
    let lookup: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
        Box::pin(callers.get(Secret::new(CALLER_TOKEN)));
    let token = lookup
        .now_or_never()
        .expect("a hit completes without waiting")
        .expect("token");
    black_box(token);
}

const ACCESS_TOKEN: &str = "bench-access-token-0123456789abcdef";

/// A source with one long-lived token: after the first fetch every request
/// is a cache hit.
struct Fixed;

impl TokenSource for Fixed {
    fn identity(&self) -> String {
        "bench".into()
    }
    fn scopes(&self) -> &[String] {
        &[]
    }
    fn fetch(&self, _reuse: Reuse) -> FetchFuture<'_> {
        Box::pin(async {
            Ok(Token::new(
                Secret::new(ACCESS_TOKEN),
                Duration::from_secs(24 * 3600),
            ))
        })
    }
}

/// Built the same way for every variant.
fn request() -> Request<()> {
    Request::get("http://upstream.internal/v1/items?limit=10")
        .header("accept", "application/json")
        .header(AUTHORIZATION, "Bearer stale")
        .body(())
        .expect("valid request")
}

/// A service the benchmark drives.
trait Driven: Service<Request<()>, Response = Response<()>, Error: Debug> {}

impl<S> Driven for S where S: Service<Request<()>, Response = Response<()>, Error: Debug> {}

/// One request through `service`: ready, call, response. Every step
/// completes at once (no I/O), so no scheduler is needed.
fn one_request(service: &mut impl Driven) {
    let request = request();
    service
        .ready()
        .now_or_never()
        .expect("inner is always ready")
        .expect("ready");
    let response = service
        .call(request)
        .now_or_never()
        .expect("hit path completes without waiting")
        .expect("response");
    black_box(response);
}

/// The three services under test, over the same inner service.
struct Services<A, B, C> {
    baseline: A,
    layer: B,
    layer_no_retry: C,
}

fn services(runtime: &tokio::runtime::Runtime) -> Services<impl Driven, impl Driven, impl Driven> {
    let inner =
        service_fn(|_request: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });

    let cache = TokenCache::new(Fixed, CacheOptions::default());
    runtime.block_on(cache.get()).expect("token");

    Services {
        baseline: SetRequestHeaderLayer::overriding(
            AUTHORIZATION,
            HeaderValue::from_static("Bearer bench-access-token-0123456789abcdef"),
        )
        .layer(inner),
        layer: BearerTokenLayer::new(cache.clone()).layer(inner),
        layer_no_retry: BearerTokenLayer::new(cache)
            .retry_on_unauthorized(false)
            .layer(inner),
    }
}

fn bench_hit_path(c: &mut Criterion, runtime: &tokio::runtime::Runtime) {
    let Services {
        mut baseline,
        mut layer,
        mut layer_no_retry,
    } = services(runtime);
    let mut group = c.benchmark_group(GROUP);
    group.bench_function(BASELINE, |b| b.iter(|| one_request(&mut baseline)));
    group.bench_function(LAYER, |b| b.iter(|| one_request(&mut layer)));
    group.bench_function(LAYER_NO_RETRY, |b| {
        b.iter(|| one_request(&mut layer_no_retry))
    });
    let callers = CallerTokens::new(FixedExchange, CallerOptions::default());
    runtime
        .block_on(callers.get(Secret::new(CALLER_TOKEN)))
        .expect("token");
    group.bench_function(PER_CALLER_HIT, |b| b.iter(|| one_caller_lookup(&callers)));
    group.finish();
}

/// Criterion's output directory, found as Criterion finds it.
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("criterion")
}

/// The time per iteration Criterion reported for the latest run, in
/// nanoseconds: the slope estimate when it has one, else the mean.
fn reported_ns(name: &str) -> Option<f64> {
    let path = criterion_dir()
        .join(GROUP)
        .join(name)
        .join("new")
        .join("estimates.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    json["slope"]["point_estimate"]
        .as_f64()
        .or_else(|| json["mean"]["point_estimate"].as_f64())
}

fn print_criterion_ratios() {
    let Some(baseline) = reported_ns(BASELINE) else {
        return;
    };
    println!();
    println!("criterion: {BASELINE} {baseline:.1} ns");
    for name in [LAYER, LAYER_NO_RETRY] {
        if let Some(ns) = reported_ns(name) {
            println!("criterion: {name} {ns:.1} ns, ratio {:.2}x", ns / baseline);
        }
    }
}

/// Nanoseconds per request for `batch` requests.
fn time_batch(batch: u32, mut one: impl FnMut()) -> f64 {
    let started = Instant::now();
    for _ in 0..batch {
        one();
    }
    started.elapsed().as_nanos() as f64 / f64::from(batch)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Alternates batches of the baseline and each layer variant; prints the
/// median per-request times and the median of the per-pair ratios.
fn print_paired_ratios(runtime: &tokio::runtime::Runtime) {
    const ROUNDS: usize = 400;
    const BATCH: u32 = 1000;
    let Services {
        mut baseline,
        mut layer,
        mut layer_no_retry,
    } = services(runtime);
    let (mut base_ns, mut layer_ns, mut no_retry_ns) = (Vec::new(), Vec::new(), Vec::new());
    let (mut layer_ratio, mut no_retry_ratio) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let b = time_batch(BATCH, || one_request(&mut baseline));
        let l = time_batch(BATCH, || one_request(&mut layer));
        let n = time_batch(BATCH, || one_request(&mut layer_no_retry));
        base_ns.push(b);
        layer_ns.push(l);
        no_retry_ns.push(n);
        layer_ratio.push(l / b);
        no_retry_ratio.push(n / b);
    }
    println!();
    println!("paired ({ROUNDS} rounds of {BATCH} requests each, medians):");
    println!("paired: {BASELINE} {:.1} ns", median(&mut base_ns));
    println!(
        "paired: {LAYER} {:.1} ns, ratio {:.2}x",
        median(&mut layer_ns),
        median(&mut layer_ratio)
    );
    println!(
        "paired: {LAYER_NO_RETRY} {:.1} ns, ratio {:.2}x",
        median(&mut no_retry_ns),
        median(&mut no_retry_ratio)
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // The cache reads tokio's clock and may spawn a refresh: give it a runtime.
    let _guard = runtime.enter();

    let mut criterion = Criterion::default().configure_from_args();
    bench_hit_path(&mut criterion, &runtime);
    criterion.final_summary();

    // A `--test` or `--list` run measures nothing; its files would be stale.
    let measured = !std::env::args().any(|a| a == "--test" || a == "--list");
    if measured {
        print_criterion_ratios();
        print_paired_ratios(&runtime);
    }
}
