//! The keeper: keeps a cache's token fresh with no caller asking.
//!
//! Refresh-ahead is started by callers, so a token nobody requests through
//! the cache (a token-only sidecar that only writes token files) would run
//! out. The keeper is the caller that never stops asking: it sleeps until
//! the token's refresh window, starts the background refresh, waits for it
//! to publish a new token (or to fail, then for the refresh-ahead pause),
//! and fetches at once when there is no usable token, pacing failures with
//! the cache's failure memory. It makes no call a caller at the same moment
//! would not make: requests and the keeper share the single flight and the
//! one background refresh.

use std::{task::Poll, time::Duration};

use tokio::time::Instant;

use super::{Lookup, TokenCache};

/// The shortest pause after a failed fetch, whatever the failure memory
/// says, so a keeper can never spin.
const MIN_PAUSE: Duration = Duration::from_millis(100);

impl TokenCache {
    /// Keeps the token fresh without any request: refreshes inside the
    /// refresh window, fetches when there is no usable token, and after a
    /// failure tries again when the cache's backoff ends. Never returns;
    /// drop the future (or abort its task) to stop it.
    ///
    /// Use it when tokens are consumed from [`subscribe`](Self::subscribe)
    /// (e.g. written to a file) rather than from [`get`](Self::get).
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use sso_token_proxy::{CacheOptions, Secret, Token, TokenCache, TokenSource, Reuse, token::FetchFuture};
    /// # struct Fixed;
    /// # impl TokenSource for Fixed {
    /// #     fn identity(&self) -> String { "fixed".into() }
    /// #     fn scopes(&self) -> &[String] { &[] }
    /// #     fn fetch(&self, _reuse: Reuse) -> FetchFuture<'_> {
    /// #         Box::pin(async { Ok(Token::new(Secret::new("abc123"), Duration::from_secs(3600))) })
    /// #     }
    /// # }
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let cache = TokenCache::new(Fixed, CacheOptions::default());
    /// let mut tokens = cache.subscribe();
    /// let keeper = tokio::spawn({
    ///     let cache = cache.clone();
    ///     async move { cache.keep_fresh().await }
    /// });
    /// // Nobody calls `get`; the keeper fetches and publishes.
    /// tokens.changed().await.unwrap();
    /// assert!(tokens.borrow().is_some());
    /// keeper.abort();
    /// # }
    /// ```
    pub async fn keep_fresh(&self) {
        let inner = &*self.inner;
        let mut published = self.subscribe();
        loop {
            published.borrow_and_update();
            let refresh_ended = inner.refresh_ahead.ended();
            tokio::pin!(refresh_ended);
            refresh_ended.as_mut().enable();
            let wake_at = match self.lookup() {
                Lookup::Hit(_) => match inner.current.load().as_ref() {
                    Some(current) => current.deadlines.refresh_from,
                    None => continue,
                },
                // A background refresh is running or was just started (the
                // lookup does that); if it fails, the next starts after its
                // pause.
                Lookup::RefreshAhead(_) => {
                    let usable_until = match inner.current.load().as_ref() {
                        Some(current) => current.deadlines.usable_until,
                        None => continue,
                    };
                    inner
                        .refresh_ahead
                        .paused_until()
                        .map_or(usable_until, |t| t.min(usable_until))
                }
                Lookup::Miss => match self.get().await {
                    Ok(_) => continue,
                    Err(e) => Instant::now() + e.retry_after.max(MIN_PAUSE),
                },
            };
            // Whichever comes first (a hand-written select: the `layer`
            // feature builds tokio without its macros).
            let mut sleep = std::pin::pin!(tokio::time::sleep_until(wake_at));
            let mut changed = std::pin::pin!(published.changed());
            std::future::poll_fn(|cx| {
                let woken = sleep.as_mut().poll(cx).is_ready()
                    || changed.as_mut().poll(cx).is_ready()
                    || refresh_ended.as_mut().poll(cx).is_ready();
                if woken {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        sync::{
            Arc, Mutex,
            atomic::{AtomicU64, Ordering},
        },
    };

    use super::*;
    use crate::{
        cache::CacheOptions,
        oidc::{OidcError, Operation, ServiceErrorKind},
        secret::Secret,
        token::{FetchFuture, Reuse, Token, TokenError, TokenSource},
    };

    /// Issues `k-0`, `k-1`, ... of a set lifetime, or scripted errors.
    #[derive(Clone, Default)]
    struct Counting {
        calls: Arc<AtomicU64>,
        lifetime: Duration,
        errors: Arc<Mutex<VecDeque<ServiceErrorKind>>>,
    }

    impl TokenSource for Counting {
        fn identity(&self) -> String {
            "counting".into()
        }
        fn scopes(&self) -> &[String] {
            &[]
        }
        fn fetch(&self, _reuse: Reuse) -> FetchFuture<'_> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst);
                if let Some(kind) = self.errors.lock().unwrap().pop_front() {
                    return Err(TokenError::Oidc(OidcError::Service {
                        operation: Operation::CreateToken,
                        kind,
                        details: Box::default(),
                    }));
                }
                Ok(Token::new(Secret::new(format!("k-{n}")), self.lifetime))
            })
        }
    }

    fn options() -> CacheOptions {
        CacheOptions {
            refresh_before_expiry: Duration::from_secs(300),
            expiry_margin: Duration::from_secs(10),
            ..Default::default()
        }
    }

    /// Records every token published, with when, until `limit` passes.
    async fn watch_for(cache: &TokenCache, limit: Duration) -> Vec<(Instant, Arc<Token>)> {
        let mut rx = cache.subscribe();
        let mut seen = Vec::new();
        let end = tokio::time::sleep(limit);
        tokio::pin!(end);
        loop {
            tokio::select! {
                () = &mut end => return seen,
                changed = rx.changed() => {
                    changed.unwrap();
                    if let Some(t) = rx.borrow_and_update().clone() {
                        seen.push((Instant::now(), t));
                    }
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_a_token_fresh_with_no_caller() {
        // 60 s tokens: window min(300 s, 30 s) = 30 s, so one refresh every
        // 30 s, each published before the previous token's margin.
        let source = Counting {
            lifetime: Duration::from_secs(60),
            ..Default::default()
        };
        let cache = TokenCache::new(source.clone(), options());
        let keeper = tokio::spawn({
            let cache = cache.clone();
            async move { cache.keep_fresh().await }
        });
        let start = Instant::now();
        let seen = watch_for(&cache, Duration::from_secs(600)).await;
        keeper.abort();
        let calls = source.calls.load(Ordering::SeqCst);
        assert!((20..=21).contains(&calls), "{calls} fetches in 10 min");
        assert_eq!(seen.len() as u64, calls, "every token was published");
        assert!(
            seen[0].0 - start < Duration::from_secs(1),
            "cold fetch at once"
        );
        for pair in seen.windows(2) {
            let (at, next) = &pair[1];
            let previous = &pair[0].1;
            assert_ne!(previous.id(), next.id());
            // Published while the previous token still had more than its
            // margin (60/4 = 15 s ⇒ min(10 s, 15 s) = 10 s) left.
            assert!(
                previous.expires_at() - *at >= Duration::from_secs(10),
                "published with {:?} left",
                previous.expires_at() - *at
            );
        }
        assert_eq!(cache.stats().refresh_ahead, calls - 1);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_refreshes_are_retried_with_the_caches_backoff() {
        let source = Counting {
            lifetime: Duration::from_secs(60),
            ..Default::default()
        };
        // The cold fetch fails twice (transient), then works; the first
        // background refresh fails three times, then works.
        source.errors.lock().unwrap().extend([
            ServiceErrorKind::InternalServer,
            ServiceErrorKind::InternalServer,
        ]);
        let cache = TokenCache::new(source.clone(), options());
        let keeper = tokio::spawn({
            let cache = cache.clone();
            async move { cache.keep_fresh().await }
        });
        let start = Instant::now();
        let seen = watch_for(&cache, Duration::from_secs(20)).await;
        assert_eq!(seen.len(), 1);
        assert_eq!(source.calls.load(Ordering::SeqCst), 3);
        // The failure memory's transient backoff: about 1 s, then 2 s
        // (equal jitter: at least half of each).
        let first = seen[0].0 - start;
        assert!(
            first >= Duration::from_millis(1500) && first <= Duration::from_secs(4),
            "{first:?}"
        );

        source.errors.lock().unwrap().extend([
            ServiceErrorKind::InternalServer,
            ServiceErrorKind::SlowDown,
            ServiceErrorKind::InternalServer,
        ]);
        let seen = watch_for(&cache, Duration::from_secs(60)).await;
        keeper.abort();
        assert!(!seen.is_empty(), "the refresh succeeded in the end");
        let stats = cache.stats();
        assert_eq!(stats.refresh_ahead_failed, 3);
        // Refreshed before the first token ran out of margin: no caller
        // would ever have waited.
        assert!(cache.current().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_token_is_replaced_at_once() {
        let source = Counting {
            lifetime: Duration::from_secs(3600),
            ..Default::default()
        };
        let cache = TokenCache::new(source.clone(), options());
        let mut rx = cache.subscribe();
        let keeper = tokio::spawn({
            let cache = cache.clone();
            async move { cache.keep_fresh().await }
        });
        rx.changed().await.unwrap();
        let first = rx.borrow_and_update().clone().unwrap();
        assert_eq!(cache.reject(&first), crate::cache::Rejection::Refresh);
        rx.changed().await.unwrap();
        assert!(rx.borrow_and_update().is_none(), "the drop is published");
        rx.changed().await.unwrap();
        let second = rx.borrow_and_update().clone().unwrap();
        assert_ne!(second.id(), first.id());
        assert_eq!(source.calls.load(Ordering::SeqCst), 2);
        keeper.abort();
    }
}
