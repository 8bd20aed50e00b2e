//! The budget of forced refreshes: refreshes an upstream `401` asks for.
//!
//! An upstream that answers `401` to everything, or a client that provokes
//! `401`s, must not turn every request into a `CreateToken` call. A token is
//! refreshed because of a rejection at most once (the cache remembers it as
//! rejected), and all rejections together may force at most
//! [`CacheOptions::forced_refreshes_per_minute`](super::CacheOptions::forced_refreshes_per_minute)
//! refreshes in any 60 seconds. Beyond that the `401` goes back to the
//! client unchanged and the token is kept.

use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

/// The sliding window the budget applies to.
pub(crate) const FORCED_REFRESH_WINDOW: Duration = Duration::from_secs(60);

/// What the cache decided about one upstream rejection, as the `decision`
/// label of `sso_token_proxy_forced_refreshes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ForcedRefreshDecision {
    /// The token is dropped and the next caller fetches a new one.
    Allowed,
    /// The token had already been dropped or replaced: no new refresh.
    Superseded,
    /// The budget is spent: the token is kept, the `401` handed back.
    Limited,
}

impl ForcedRefreshDecision {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Superseded => "superseded",
            Self::Limited => "limited",
        }
    }
}

/// At most `limit` forced refreshes in any [`FORCED_REFRESH_WINDOW`].
#[derive(Debug)]
pub(crate) struct ForcedRefreshBudget {
    /// Refreshes allowed per window.
    limit: usize,
    /// When each refresh of the current window was allowed, oldest first;
    /// never longer than `limit`.
    allowed_at: VecDeque<Instant>,
}

impl ForcedRefreshBudget {
    pub(crate) fn new(limit: u32) -> Self {
        let limit = limit as usize;
        Self {
            limit,
            allowed_at: VecDeque::with_capacity(limit.min(64)),
        }
    }

    /// Takes one refresh from the budget if there is one left at `now`.
    pub(crate) fn try_take(&mut self, now: Instant) -> bool {
        while let Some(&oldest) = self.allowed_at.front() {
            if now.saturating_duration_since(oldest) >= FORCED_REFRESH_WINDOW {
                self.allowed_at.pop_front();
            } else {
                break;
            }
        }
        if self.allowed_at.len() >= self.limit {
            return false;
        }
        self.allowed_at.push_back(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn allows_the_limit_per_sliding_minute() {
        let mut budget = ForcedRefreshBudget::new(3);
        let start = Instant::now();
        assert!(budget.try_take(start));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(budget.try_take(Instant::now()));
        assert!(budget.try_take(Instant::now()));
        assert!(!budget.try_take(Instant::now()));
        // 59 s after the first: still three in the window.
        tokio::time::advance(Duration::from_secs(49)).await;
        assert!(!budget.try_take(Instant::now()));
        // 60 s after the first: it has left the window, the other two not.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(budget.try_take(Instant::now()));
        assert!(!budget.try_take(Instant::now()));
        // A quiet minute refills it.
        tokio::time::advance(FORCED_REFRESH_WINDOW).await;
        for _ in 0..3 {
            assert!(budget.try_take(Instant::now()));
        }
        assert!(!budget.try_take(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_never_allows() {
        let mut budget = ForcedRefreshBudget::new(0);
        assert!(!budget.try_take(Instant::now()));
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(!budget.try_take(Instant::now()));
    }
}
