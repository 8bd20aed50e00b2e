//! The cache as a whole, on a paused clock, against scripted sources.

use std::{
    collections::VecDeque,
    sync::atomic::{AtomicU64, Ordering},
    time::SystemTime,
};

use futures_util::FutureExt;

use super::*;
use crate::{
    oidc::{OidcError, Operation, ServiceErrorKind},
    secret::Secret,
    token::FetchFuture,
};

#[derive(Default)]
struct FakeState {
    calls: AtomicU64,
    lifetime: Mutex<Duration>,
    delay: Duration,
    script: Mutex<VecDeque<ServiceErrorKind>>,
    always_fail: Mutex<Option<ServiceErrorKind>>,
}

/// Issues `tok-0`, `tok-1`, ... of a set lifetime after a set delay, or
/// scripted errors.
#[derive(Clone)]
struct Fake(Arc<FakeState>);

impl Fake {
    fn new(lifetime: Duration, delay: Duration) -> Self {
        Self(Arc::new(FakeState {
            lifetime: Mutex::new(lifetime),
            delay,
            ..Default::default()
        }))
    }
    fn calls(&self) -> u64 {
        self.0.calls.load(Ordering::SeqCst)
    }
}

fn service_error(kind: ServiceErrorKind) -> TokenError {
    TokenError::Oidc(OidcError::Service {
        operation: Operation::CreateToken,
        kind,
        details: Box::default(),
    })
}

impl TokenSource for Fake {
    fn identity(&self) -> String {
        "fake".into()
    }
    fn scopes(&self) -> &[String] {
        &[]
    }
    fn fetch(&self, _reuse: Reuse) -> FetchFuture<'_> {
        Box::pin(async move {
            let n = self.0.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.0.delay).await;
            let scripted = self.0.script.lock().unwrap().pop_front();
            if let Some(kind) = scripted.or(*self.0.always_fail.lock().unwrap()) {
                return Err(service_error(kind));
            }
            let lifetime = *self.0.lifetime.lock().unwrap();
            Ok(Token::new(Secret::new(format!("tok-{n}")), lifetime))
        })
    }
}

/// Like an SSO cache file: hands back the token "in the file" while it is
/// valid for what the caller asks, reading it anew each time (a new
/// `Token` object, the same value); issues a new one when asked to, or when
/// `stubborn`, never.
#[derive(Default)]
struct FileLikeState {
    file: Mutex<Option<(String, SystemTime)>>,
    issued: AtomicU64,
    reuse_asked: Mutex<Vec<Reuse>>,
    stubborn: std::sync::atomic::AtomicBool,
}

#[derive(Clone, Default)]
struct FileLike(Arc<FileLikeState>);

impl TokenSource for FileLike {
    fn identity(&self) -> String {
        "file-like".into()
    }
    fn scopes(&self) -> &[String] {
        &[]
    }
    fn fetch(&self, reuse: Reuse) -> FetchFuture<'_> {
        Box::pin(async move {
            self.0.reuse_asked.lock().unwrap().push(reuse);
            let mut file = self.0.file.lock().unwrap();
            if let Some((value, expires)) = &*file {
                let token = Token::expiring_at(Secret::new(value.clone()), *expires);
                let reusable = match reuse {
                    Reuse::IfValidFor(min) => token.ttl() >= min,
                    Reuse::Never => self.0.stubborn.load(Ordering::SeqCst),
                };
                if reusable {
                    return Ok(token);
                }
            }
            let n = self.0.issued.fetch_add(1, Ordering::SeqCst);
            let value = format!("file-{n}");
            let expires = SystemTime::now() + Duration::from_secs(3600);
            *file = Some((value.clone(), expires));
            Ok(Token::expiring_at(Secret::new(value), expires))
        })
    }
}

fn options(window: u64) -> CacheOptions {
    CacheOptions {
        refresh_before_expiry: Duration::from_secs(window),
        expiry_margin: Duration::from_secs(1),
        ..Default::default()
    }
}

#[tokio::test(start_paused = true)]
async fn cold_burst_is_one_fetch() {
    let fake = Fake::new(Duration::from_secs(3600), Duration::from_millis(100));
    let cache = TokenCache::new(fake.clone(), options(300));
    let gets = (0..1000).map(|_| {
        let c = cache.clone();
        tokio::spawn(async move { c.get().await.map(|t| t.id()) })
    });
    let ids: Vec<_> = futures_util::future::join_all(gets).await;
    let first = ids[0].as_ref().unwrap().as_ref().unwrap();
    assert!(
        ids.iter()
            .all(|r| r.as_ref().unwrap().as_ref().unwrap() == first)
    );
    assert_eq!(fake.calls(), 1);
    assert_eq!(cache.stats().fetch_success, 1);
}

#[tokio::test(start_paused = true)]
async fn one_background_refresh_per_window_and_nobody_waits() {
    let fake = Fake::new(Duration::from_secs(100), Duration::from_secs(2));
    let cache = TokenCache::new(fake.clone(), options(20));
    let mut current = cache.get().await.unwrap();
    assert_eq!(fake.calls(), 1);
    for window in 1..=5u64 {
        // Outside the window: plain hits.
        tokio::time::advance(Duration::from_secs(70)).await;
        assert_eq!(cache.try_get_now().unwrap().id(), current.id());
        assert_eq!(fake.calls(), window);
        // Inside it: every caller gets the current token at once while
        // exactly one refresh runs.
        tokio::time::advance(Duration::from_secs(15)).await;
        for _ in 0..100 {
            let t = cache
                .get()
                .now_or_never()
                .expect("hit path never waits")
                .unwrap();
            assert_eq!(t.id(), current.id());
        }
        // Let the spawned refresh start.
        tokio::task::yield_now().await;
        assert_eq!(fake.calls(), window + 1);
        // Let the refresh (2 s) finish.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let next = cache.try_get_now().unwrap();
        assert_ne!(next.id(), current.id());
        current = next;
        assert_eq!(fake.calls(), window + 1);
    }
    assert_eq!(cache.stats().refresh_ahead, 5);
}

/// A caller that finds the token unusable while its background refresh is
/// still under way (a slow source) waits for that refresh instead of
/// fetching a second token.
#[tokio::test(start_paused = true)]
async fn a_miss_during_a_background_refresh_waits_for_it() {
    let fake = Fake::new(Duration::from_secs(4), Duration::from_millis(1500));
    let cache = TokenCache::new(fake.clone(), CacheOptions::default());
    let first = cache.get().await.unwrap();
    assert_eq!(fake.calls(), 1);
    // Inside the window (2 s before expiry): the refresh starts, slowly.
    tokio::time::advance(Duration::from_millis(2100)).await;
    assert_eq!(cache.try_get_now().unwrap().id(), first.id());
    tokio::task::yield_now().await;
    assert_eq!(fake.calls(), 2);
    // Past the margin (1 s before expiry) before the refresh returns.
    tokio::time::advance(Duration::from_millis(1000)).await;
    assert!(cache.try_get_now().is_none());
    let next = cache.get().await.unwrap();
    assert_ne!(next.id(), first.id());
    assert_eq!(fake.calls(), 2, "no second fetch");
    assert!(next.ttl() > Duration::from_secs(3));
}

/// Issue 13: with the default margins (10 s, 5 min), tokens of 2 s, 30 s,
/// 1 h and 12 h are each used for a sensible share of their life over five
/// lifetimes: only the cold start waits, no caller ever gets a token with
/// less than the scaled margin left, and `CreateToken` is called once per
/// `lifetime - refresh window`, at most about twice per lifetime.
#[tokio::test(start_paused = true)]
async fn tokens_of_any_lifetime_serve_with_scaled_margins() {
    const LIFETIMES: usize = 5;
    for (lifetime, margin, window) in [
        (
            Duration::from_secs(2),
            Duration::from_millis(500),
            Duration::from_secs(1),
        ),
        (
            Duration::from_secs(30),
            Duration::from_millis(7500),
            Duration::from_secs(15),
        ),
        (
            Duration::from_secs(3600),
            Duration::from_secs(10),
            Duration::from_secs(300),
        ),
        (
            Duration::from_secs(12 * 3600),
            Duration::from_secs(10),
            Duration::from_secs(300),
        ),
    ] {
        let fake = Fake::new(lifetime, Duration::from_millis(50));
        let cache = TokenCache::new(fake.clone(), CacheOptions::default());
        let step = (lifetime / 50).min(window / 4);
        let total = lifetime * LIFETIMES as u32;
        let start = Instant::now();
        let mut misses = 0;
        let mut least_left = Duration::MAX;
        while start.elapsed() < total {
            if matches!(cache.lookup(), Lookup::Miss) {
                misses += 1;
            }
            let token = cache.get().await.unwrap();
            let left = token.ttl();
            assert!(left > margin, "{lifetime:?}: handed out with {left:?} left");
            least_left = least_left.min(left);
            tokio::time::sleep(step).await;
        }
        let calls = fake.calls() as usize;
        let period = lifetime - window;
        let expected = 1 + (total.as_millis() / period.as_millis()) as usize;
        assert_eq!(misses, 1, "{lifetime:?}: only the cold start waits");
        assert!(
            (expected - 1..=expected).contains(&calls),
            "{lifetime:?}: {calls} CreateToken calls, expected about {expected}"
        );
        assert!(calls <= 2 * LIFETIMES + 1, "{lifetime:?}: {calls}");
        // Refreshed inside the window, not long before it.
        assert!(least_left <= window, "{lifetime:?}: {least_left:?}");
        assert_eq!(cache.stats().refresh_ahead_failed, 0);
    }
}

/// Issue 13: a source that hands back tokens that cannot serve is a
/// remembered failure with its own kind and backoff, not a fetch loop.
#[tokio::test(start_paused = true)]
async fn unusable_tokens_are_a_remembered_failure_not_a_fetch_loop() {
    for lifetime in [Duration::ZERO, Duration::from_millis(400)] {
        let fake = Fake::new(lifetime, Duration::from_millis(1));
        let cache = TokenCache::new(fake.clone(), CacheOptions::default());
        let err = cache.get().await.unwrap_err();
        assert_eq!(err.kind(), "ExpiredOnArrival", "{lifetime:?}");
        assert_eq!(err.class(), ErrorClass::Transient);
        assert!(err.retry_after >= Duration::from_millis(500));
        // A second of requests: answered from memory.
        for _ in 0..1000 {
            assert_eq!(cache.get().await.unwrap_err().kind(), "ExpiredOnArrival");
            tokio::time::advance(Duration::from_micros(400)).await;
        }
        assert_eq!(fake.calls(), 1, "{lifetime:?}");
        // Once the source heals, the next attempt after the backoff serves.
        *fake.0.lifetime.lock().unwrap() = Duration::from_secs(60);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(cache.get().await.is_ok());
        assert_eq!(fake.calls(), 2);
    }
}

#[tokio::test(start_paused = true)]
async fn fatal_failure_is_remembered() {
    let fake = Fake::new(Duration::from_secs(3600), Duration::from_millis(10));
    fake.0
        .always_fail
        .lock()
        .unwrap()
        .replace(ServiceErrorKind::InvalidGrant);
    let cache = TokenCache::new(fake.clone(), options(300));
    let err = cache.get().await.unwrap_err();
    assert_eq!(err.kind(), "InvalidGrant");
    assert!(err.retry_after > Duration::ZERO);
    assert_eq!(fake.calls(), 1);
    // A thousand callers over the next second cause no further call.
    for _ in 0..1000 {
        tokio::time::advance(Duration::from_millis(1)).await;
        let err = cache.get().await.unwrap_err();
        assert_eq!(err.kind(), "InvalidGrant");
    }
    assert_eq!(fake.calls(), 1);
    assert!(cache.stats().failures_served_from_memory >= 1000);
    // After the backoff, one new attempt; the backoff grows.
    tokio::time::advance(Duration::from_secs(6)).await;
    let first_retry_after = cache.get().await.unwrap_err().retry_after;
    assert_eq!(fake.calls(), 2);
    assert!(
        first_retry_after >= Duration::from_secs(5),
        "{first_retry_after:?}"
    );
    // Healing clears the memory.
    fake.0.always_fail.lock().unwrap().take();
    tokio::time::advance(first_retry_after).await;
    assert!(cache.get().await.is_ok());
    assert!(cache.last_failure().is_none());
}

#[tokio::test(start_paused = true)]
async fn failed_refresh_keeps_the_valid_token_until_it_expires() {
    let fake = Fake::new(Duration::from_secs(100), Duration::from_millis(10));
    let cache = TokenCache::new(fake.clone(), options(30));
    let t1 = cache.get().await.unwrap();
    fake.0
        .always_fail
        .lock()
        .unwrap()
        .replace(ServiceErrorKind::InternalServer);
    tokio::time::advance(Duration::from_secs(75)).await;
    for _ in 0..200 {
        assert_eq!(cache.get().await.unwrap().id(), t1.id());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Ten seconds of requests inside the window: a few paced refresh
    // attempts, not one per request.
    let calls = fake.calls();
    assert!((2..=6).contains(&calls), "calls = {calls}");
    assert!(cache.stats().refresh_ahead_failed >= 1);
    // Past expiry: a typed error naming the cause.
    tokio::time::advance(Duration::from_secs(20)).await;
    let err = cache.get().await.unwrap_err();
    assert_eq!(err.kind(), "InternalServer");
    assert_eq!(err.class(), ErrorClass::Transient);
}

#[tokio::test(start_paused = true)]
async fn reject_burst_for_one_old_token_is_one_refresh() {
    let fake = Fake::new(Duration::from_secs(3600), Duration::from_millis(50));
    let cache = TokenCache::new(fake.clone(), options(300));
    let old = cache.get().await.unwrap();
    let tasks = (0..100).map(|_| {
        let (c, old) = (cache.clone(), old.clone());
        tokio::spawn(async move {
            assert_eq!(c.reject(&old), Rejection::Refresh);
            c.get().await.unwrap().id()
        })
    });
    let ids: Vec<_> = futures_util::future::join_all(tasks).await;
    assert!(ids.iter().all(|id| *id.as_ref().unwrap() != old.id()));
    assert_eq!(fake.calls(), 2);
    assert_eq!(cache.stats().invalidations, 1);
    // A late rejection of the old token leaves the new one alone.
    let new = cache.get().await.unwrap();
    assert_eq!(cache.reject(&old), Rejection::Refresh);
    assert_eq!(cache.get().await.unwrap().id(), new.id());
    assert_eq!(fake.calls(), 2);
    assert_eq!(cache.stats().invalidations, 1);
}

#[tokio::test(start_paused = true)]
async fn rejections_beyond_the_budget_keep_the_token() {
    let fake = Fake::new(Duration::from_secs(3600), Duration::from_millis(10));
    let cache = TokenCache::new(fake.clone(), options(300));
    // Three forced refreshes a minute, one per token.
    for n in 1..=3 {
        let token = cache.get().await.unwrap();
        assert_eq!(cache.reject(&token), Rejection::Refresh);
        assert!(
            cache.try_get_now().is_none(),
            "the rejected token is dropped"
        );
        assert_ne!(cache.get().await.unwrap().id(), token.id());
        assert_eq!(fake.calls(), n + 1);
    }
    let kept = cache.get().await.unwrap();
    for _ in 0..1000 {
        assert_eq!(cache.reject(&kept), Rejection::Limited);
        assert_eq!(cache.try_get_now().unwrap().id(), kept.id());
    }
    assert_eq!(fake.calls(), 4);
    assert_eq!(cache.stats().forced_refreshes_limited, 1000);
    // The window slides: a minute after the first, one more is allowed.
    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(cache.reject(&kept), Rejection::Refresh);
    assert_ne!(cache.get().await.unwrap().id(), kept.id());
    assert_eq!(fake.calls(), 5);
}

#[tokio::test(start_paused = true)]
async fn a_rejected_token_put_back_by_a_racing_caller_is_not_handed_out() {
    let fake = Fake::new(Duration::from_secs(3600), Duration::from_millis(10));
    let cache = TokenCache::new(fake.clone(), options(300));
    let old = cache.get().await.unwrap();
    assert_eq!(cache.reject(&old), Rejection::Refresh);
    // A caller that read `old` just before the rejection stores it again,
    // as the single flight can.
    cache.inner.single_flight.insert(Arc::clone(&old)).await;
    cache.publish(&old);
    let new = cache.get().await.unwrap();
    assert_ne!(new.id(), old.id());
    assert_eq!(fake.calls(), 2);
}

/// Issue 13: a token is known by its value. A source that reads the
/// rejected token back from its file (a new object each time) is asked
/// again with `Reuse::Never`, and the rejected value is never handed out.
#[tokio::test(start_paused = true)]
async fn a_rejected_token_read_back_from_a_file_is_never_handed_out() {
    let file = FileLike::default();
    let cache = TokenCache::new(file.clone(), options(300));
    let first = cache.get().await.unwrap();
    assert_eq!(first.access_token().expose(), "file-0");
    assert_eq!(cache.reject(&first), Rejection::Refresh);
    let second = cache.get().await.unwrap();
    assert_eq!(second.access_token().expose(), "file-1");
    let asked = file.0.reuse_asked.lock().unwrap().clone();
    assert_eq!(
        asked,
        [
            Reuse::IfValidFor(Duration::from_secs(301)),
            Reuse::IfValidFor(Duration::from_secs(301)),
            Reuse::Never,
        ]
    );
    // A request still carrying a new object of the rejected value changes
    // nothing.
    let again = Token::expiring_at(first.access_token().clone(), first.expires_at_wall());
    assert_eq!(again.id(), first.id());
    assert_eq!(cache.reject(&again), Rejection::Refresh);
    assert_eq!(cache.get().await.unwrap().id(), second.id());
    assert_eq!(file.0.issued.load(Ordering::SeqCst), 2);
}

/// A source that hands the rejected token back even when asked for a new
/// one: a typed, remembered failure, and the token is never handed out.
#[tokio::test(start_paused = true)]
async fn a_source_that_keeps_handing_back_the_rejected_token_is_a_failure() {
    let file = FileLike::default();
    let cache = TokenCache::new(file.clone(), options(300));
    let first = cache.get().await.unwrap();
    file.0.stubborn.store(true, Ordering::SeqCst);
    assert_eq!(cache.reject(&first), Rejection::Refresh);
    let err = cache.get().await.unwrap_err();
    assert_eq!(err.kind(), "RejectedAgain");
    let asked = file.0.reuse_asked.lock().unwrap().len();
    for _ in 0..100 {
        assert_eq!(cache.get().await.unwrap_err().kind(), "RejectedAgain");
    }
    assert_eq!(
        file.0.reuse_asked.lock().unwrap().len(),
        asked,
        "remembered"
    );
    assert!(cache.current().is_none());
}

#[tokio::test(start_paused = true)]
async fn expired_entry_is_refetched_even_though_moka_still_holds_it() {
    let fake = Fake::new(Duration::from_secs(60), Duration::from_millis(10));
    let cache = TokenCache::new(fake.clone(), options(10));
    let t1 = cache.get().await.unwrap();
    // Jump past expiry without any request in the window.
    tokio::time::advance(Duration::from_secs(120)).await;
    let t2 = cache.get().await.unwrap();
    assert_ne!(t1.id(), t2.id());
    assert!(t2.is_valid());
    assert_eq!(fake.calls(), 2);
}
