//! Cost of a `TokenCache` hit: the synchronous hot path (`try_get_now`) and
//! the async `get` on a warm cache, next to a plain `moka::future::Cache::get`
//! of the same value, which is what the hot slot saves on every request.
//!
//! `cargo bench --bench cache -- --warm-up-time 1 --measurement-time 3`

use std::{hint::black_box, sync::Arc, time::Duration};

use criterion::Criterion;
use futures_util::FutureExt;
use sso_token_proxy::{
    Secret,
    cache::{CacheOptions, TokenCache},
    token::{FetchFuture, Reuse, Token, TokenSource},
};

/// One long-lived token: after the first fetch every call is a hit.
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

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = runtime.enter();
    let cache = TokenCache::new(Fixed, CacheOptions::default());
    let token = runtime.block_on(cache.get()).expect("warm");
    let moka: moka::future::Cache<u8, Arc<Token>> = moka::future::Cache::new(16);
    runtime.block_on(moka.insert(0, token));

    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("cache_hit");
    group.bench_function("try_get_now", |b| {
        b.iter(|| black_box(cache.try_get_now().expect("hit").header_value().clone()))
    });
    group.bench_function("get_now_or_never", |b| {
        b.iter(|| {
            let t = cache.get().now_or_never().expect("no wait").expect("token");
            black_box(t.header_value().clone())
        })
    });
    group.bench_function("moka_get_baseline", |b| {
        b.iter(|| {
            let t = moka
                .get(&0)
                .now_or_never()
                .expect("no wait")
                .expect("present");
            black_box(t.header_value().clone())
        })
    });
    group.finish();
    c.final_summary();
}
