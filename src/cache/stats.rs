//! What the cache did, counted: [`CacheStats`].

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of what the cache did; see
/// [`TokenCache::stats`](super::TokenCache::stats).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Fetches that produced a token.
    pub fetch_success: u64,
    /// Fetches that failed throttled (after retries).
    pub fetch_throttled: u64,
    /// Fetches that failed transiently (after retries), an unusable token
    /// included.
    pub fetch_transient: u64,
    /// Fetches that failed fatally.
    pub fetch_fatal: u64,
    /// Background refreshes started.
    pub refresh_ahead: u64,
    /// Background refreshes that failed (the old token was kept).
    pub refresh_ahead_failed: u64,
    /// Callers answered from a remembered failure without a fetch.
    pub failures_served_from_memory: u64,
    /// Tokens invalidated after an upstream rejected them (forced
    /// refreshes allowed).
    pub invalidations: u64,
    /// Upstream rejections turned away because the forced-refresh budget
    /// was spent.
    pub forced_refreshes_limited: u64,
}

/// The live counters behind [`CacheStats`]; each field counts what the
/// field of the same name there documents.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) fetch_success: AtomicU64,
    pub(super) fetch_throttled: AtomicU64,
    pub(super) fetch_transient: AtomicU64,
    pub(super) fetch_fatal: AtomicU64,
    pub(super) refresh_ahead: AtomicU64,
    pub(super) refresh_ahead_failed: AtomicU64,
    pub(super) failures_served_from_memory: AtomicU64,
    pub(super) invalidations: AtomicU64,
    pub(super) forced_refreshes_limited: AtomicU64,
}

impl Counters {
    /// Adds one to `counter`.
    pub(super) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn snapshot(&self) -> CacheStats {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        CacheStats {
            fetch_success: load(&self.fetch_success),
            fetch_throttled: load(&self.fetch_throttled),
            fetch_transient: load(&self.fetch_transient),
            fetch_fatal: load(&self.fetch_fatal),
            refresh_ahead: load(&self.refresh_ahead),
            refresh_ahead_failed: load(&self.refresh_ahead_failed),
            failures_served_from_memory: load(&self.failures_served_from_memory),
            invalidations: load(&self.invalidations),
            forced_refreshes_limited: load(&self.forced_refreshes_limited),
        }
    }
}
