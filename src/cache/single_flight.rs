//! Single-flight fetches: any number of callers that find no token cause
//! one fetch. moka's `try_get_with` runs the first caller's fetch and hands
//! its result, token or error, to every caller that arrived meanwhile;
//! errors are not kept (the failure memory does that).
//!
//! moka's own expiry runs on its own clock, not tokio's, so it only evicts
//! dead entries; whether a token is still good is decided by the cache on
//! tokio's clock, and a stale entry is removed with
//! [`remove_if_holds`](SingleFlight::remove_if_holds).

use std::{future::Future, sync::Arc, time::Duration};

use moka::{Expiry, future::Cache, ops::compute::Op};

use crate::token::{Token, TokenError};

/// A failed fetch, shared by every caller that waited for it: the error and
/// how long callers should wait.
pub(super) type SharedFailure = Arc<(TokenError, Duration)>;

/// The one slot fetches are coalesced on.
pub(super) struct SingleFlight {
    /// moka keyed by `()`: one cache holds one source's token.
    slot: Cache<(), Arc<Token>>,
}

/// Evicts an entry when its token expires.
struct TokenExpiry;

impl Expiry<(), Arc<Token>> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &(),
        value: &Arc<Token>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl())
    }

    fn expire_after_update(
        &self,
        _key: &(),
        value: &Arc<Token>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        // Without this, a replaced entry would keep its predecessor's deadline.
        Some(value.ttl())
    }
}

impl SingleFlight {
    pub(super) fn new() -> Self {
        Self {
            slot: Cache::builder()
                .max_capacity(16)
                .expire_after(TokenExpiry)
                .build(),
        }
    }

    /// The token in the slot, or the result of `fetch`, run by the first of
    /// the callers that find the slot empty.
    pub(super) async fn get_or_fetch<F>(&self, fetch: F) -> Result<Arc<Token>, SharedFailure>
    where
        F: Future<Output = Result<Arc<Token>, (TokenError, Duration)>>,
    {
        self.slot.try_get_with((), fetch).await
    }

    /// Puts `token` in the slot (a background refresh finished).
    pub(super) async fn insert(&self, token: Arc<Token>) {
        self.slot.insert((), token).await;
    }

    /// Empties the slot if it holds token `id`.
    pub(super) async fn remove_if_holds(&self, id: u64) {
        self.slot
            .entry(())
            .and_compute_with(|entry| {
                let op = match entry {
                    Some(e) if e.value().id() == id => Op::Remove,
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::secret::Secret;

    fn token(value: &str) -> Arc<Token> {
        Arc::new(Token::new(Secret::new(value), Duration::from_secs(60)))
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_fetch() {
        let flight = Arc::new(SingleFlight::new());
        let fetches = Arc::new(AtomicUsize::new(0));
        let tasks = (0..50).map(|_| {
            let (flight, fetches) = (flight.clone(), fetches.clone());
            tokio::spawn(async move {
                flight
                    .get_or_fetch(async {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok(token("one"))
                    })
                    .await
                    .unwrap()
                    .id()
            })
        });
        let ids = futures_util::future::join_all(tasks).await;
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert!(
            ids.iter()
                .all(|id| *id.as_ref().unwrap() == token("one").id())
        );
    }

    #[tokio::test]
    async fn errors_are_shared_but_not_kept_and_removal_is_conditional() {
        let flight = SingleFlight::new();
        let failed = flight
            .get_or_fetch(async { Err((TokenError::RejectedAgain, Duration::from_secs(1))) })
            .await
            .unwrap_err();
        assert_eq!(failed.0.kind_name(), "RejectedAgain");
        let a = flight.get_or_fetch(async { Ok(token("a")) }).await.unwrap();
        flight.remove_if_holds(token("b").id()).await;
        let still = flight.get_or_fetch(async { Ok(token("c")) }).await.unwrap();
        assert_eq!(
            still.id(),
            a.id(),
            "removal of another token leaves the slot"
        );
        flight.remove_if_holds(a.id()).await;
        let c = flight.get_or_fetch(async { Ok(token("c")) }).await.unwrap();
        assert_eq!(c.id(), token("c").id());
    }
}
