//! Cost of `BearerTokenLayer` on the cache-hit path, against tower-http's
//! `SetRequestHeaderLayer::overriding` with a static value: same inner
//! service, same requests, same run.
//!
//! `cargo bench --bench layer -- --warm-up-time 1 --measurement-time 3`
//!
//! After the runs it prints the ratio of the two means (read back from
//! Criterion's `estimates.json`).

use std::{convert::Infallible, fmt::Debug, hint::black_box, path::PathBuf, time::Duration};

use criterion::Criterion;
use futures_util::FutureExt;
use http::{HeaderValue, Request, Response, header::AUTHORIZATION};
use sso_token_proxy::{
    cache::{CacheOptions, TokenCache},
    layer::BearerTokenLayer,
    secret::Secret,
    token::{FetchFuture, Reuse, Token, TokenSource},
};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_http::set_header::SetRequestHeaderLayer;

const GROUP: &str = "hit_path";
const BASELINE: &str = "set_request_header_static";
const LAYER: &str = "bearer_token_layer";
const LAYER_NO_RETRY: &str = "bearer_token_layer_no_retry";

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
                Secret::new("bench-access-token-0123456789abcdef"),
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

/// One request through `service`: ready, call, response. Every step
/// completes at once (no I/O), so no scheduler is needed.
fn one_request<S>(service: &mut S)
where
    S: Service<Request<()>, Response = Response<()>>,
    S::Error: Debug,
{
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

fn bench_hit_path(c: &mut Criterion, runtime: &tokio::runtime::Runtime) {
    let inner = service_fn(|_request: Request<()>| async { Ok::<_, Infallible>(Response::new(())) });

    let cache = TokenCache::new(Fixed, CacheOptions::default());
    runtime.block_on(cache.get()).expect("token");

    let mut baseline = SetRequestHeaderLayer::overriding(
        AUTHORIZATION,
        HeaderValue::from_static("Bearer bench-access-token-0123456789abcdef"),
    )
    .layer(inner);
    let mut layered = BearerTokenLayer::new(cache.clone()).layer(inner);
    let mut layered_no_retry = BearerTokenLayer::new(cache)
        .retry_on_unauthorized(false)
        .layer(inner);

    let mut group = c.benchmark_group(GROUP);
    group.bench_function(BASELINE, |b| b.iter(|| one_request(&mut baseline)));
    group.bench_function(LAYER, |b| b.iter(|| one_request(&mut layered)));
    group.bench_function(LAYER_NO_RETRY, |b| b.iter(|| one_request(&mut layered_no_retry)));
    group.finish();

    let mut g = c.benchmark_group("pieces");
    g.bench_function("request_only", |b| b.iter(|| black_box(request())));
    g.bench_function("tokio_now", |b| b.iter(|| black_box(tokio::time::Instant::now())));
    g.bench_function("std_now", |b| b.iter(|| black_box(std::time::Instant::now())));
    let cache2 = TokenCache::new(Fixed, CacheOptions::default());
    runtime.block_on(cache2.get()).expect("token");
    g.bench_function("lookup", |b| b.iter(|| black_box(cache2.lookup())));
    g.bench_function("clone_request", |b| b.iter_batched(request, |r| {
        let mut copy = Request::new(());
        *copy.method_mut() = r.method().clone();
        *copy.uri_mut() = r.uri().clone();
        *copy.version_mut() = r.version();
        *copy.headers_mut() = r.headers().clone();
        *copy.extensions_mut() = r.extensions().clone();
        black_box((copy, r))
    }, criterion::BatchSize::SmallInput));
    g.bench_function("clone_request_derive", |b| b.iter_batched(request, |r| {
        black_box((r.clone(), r))
    }, criterion::BatchSize::SmallInput));
    g.finish();
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

/// Mean time per iteration in nanoseconds from the latest run.
fn mean_ns(name: &str) -> Option<f64> {
    let path = criterion_dir().join(GROUP).join(name).join("new").join("estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

fn print_ratios() {
    let Some(baseline) = mean_ns(BASELINE) else {
        return;
    };
    println!();
    println!("{GROUP}: {BASELINE} mean {baseline:.1} ns");
    for name in [LAYER, LAYER_NO_RETRY] {
        if let Some(mean) = mean_ns(name) {
            println!("{GROUP}: {name} mean {mean:.1} ns, ratio {:.2}x", mean / baseline);
        }
    }
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
        print_ratios();
    }
}
