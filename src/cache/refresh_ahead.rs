//! Refresh-ahead scheduling: inside a token's refresh window the first
//! caller starts one background refresh; everybody keeps the current token
//! meanwhile. A failed refresh is tried again after a pause, not on every
//! request, until the token is unusable (then callers fetch, and the
//! failure memory paces them).

use std::{sync::Mutex, time::Duration};

use tokio::{sync::Notify, time::Instant};

use crate::retry::Backoff;

/// Bookkeeping of the background refresh; touched only inside the refresh
/// window.
#[derive(Debug, Default)]
struct Schedule {
    /// The token a refresh was last started for (one refresh per token).
    started_for: Option<u64>,
    /// A refresh is running.
    in_flight: bool,
    /// After a failed refresh: not before then.
    not_before: Option<Instant>,
    /// Failed refreshes in a row; the pause grows with it.
    failures: u32,
}

/// Decides when a background refresh starts.
#[derive(Debug, Default)]
pub(super) struct RefreshAheadSchedule {
    /// Locked only inside a refresh window, never on a plain hit.
    schedule: Mutex<Schedule>,
    /// Wakes callers waiting for the running refresh.
    finished: Notify,
}

impl RefreshAheadSchedule {
    /// Whether the caller that found token `id` inside its refresh window at
    /// `now` should start the refresh. At most one runs; each token gets
    /// one (more only after a failure and its pause).
    pub(super) fn try_start(&self, id: u64, now: Instant) -> bool {
        let mut s = self.schedule.lock().expect("refresh lock");
        if s.in_flight || s.started_for == Some(id) || s.not_before.is_some_and(|t| now < t) {
            return false;
        }
        s.in_flight = true;
        s.started_for = Some(id);
        true
    }

    /// The refresh ended: `refreshed` when it produced a token that expires
    /// later. Otherwise the next attempt waits for `backoff`'s next delay.
    /// Returns that delay, if any.
    pub(super) fn finish(&self, refreshed: bool, backoff: &Backoff) -> Option<Duration> {
        let delay = {
            let mut s = self.schedule.lock().expect("refresh lock");
            s.in_flight = false;
            if refreshed {
                s.failures = 0;
                s.not_before = None;
                None
            } else {
                s.failures += 1;
                let delay = backoff.delay(s.failures - 1);
                let now = Instant::now();
                s.not_before = Some(now.checked_add(delay).unwrap_or(now));
                s.started_for = None;
                Some(delay)
            }
        };
        self.finished.notify_waiters();
        delay
    }

    /// Waits for the running refresh, if one runs: a caller that finds the
    /// token unusable while it is under way takes its result instead of
    /// fetching a second token.
    pub(super) async fn wait_if_running(&self) {
        let finished = self.finished.notified();
        tokio::pin!(finished);
        // Registered before the check, so a refresh ending in between wakes it.
        finished.as_mut().enable();
        if !self.schedule.lock().expect("refresh lock").in_flight {
            return;
        }
        finished.await;
    }

    /// After a failed refresh, when the next may start (while no refresh
    /// runs).
    pub(super) fn paused_until(&self) -> Option<Instant> {
        let s = self.schedule.lock().expect("refresh lock");
        s.not_before.filter(|_| !s.in_flight)
    }

    /// Resolves when a refresh ends (only for a future created before the
    /// end and polled, or `enable`d, by then; see [`Notify::notified`]).
    pub(super) fn ended(&self) -> tokio::sync::futures::Notified<'_> {
        self.finished.notified()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::Jitter;

    const BACKOFF: Backoff = Backoff {
        base: Duration::from_secs(1),
        factor: 2.0,
        cap: Duration::from_secs(30),
        jitter: Jitter::None,
    };

    #[tokio::test(start_paused = true)]
    async fn one_refresh_per_token_and_one_at_a_time() {
        let schedule = RefreshAheadSchedule::default();
        let now = Instant::now();
        assert!(schedule.try_start(1, now));
        assert!(!schedule.try_start(1, now), "running");
        assert!(!schedule.try_start(2, now), "running, whatever the token");
        assert_eq!(schedule.finish(true, &BACKOFF), None);
        assert!(!schedule.try_start(1, now), "token 1 had its refresh");
        assert!(schedule.try_start(2, now));
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_wake_when_the_refresh_ends() {
        let schedule = std::sync::Arc::new(RefreshAheadSchedule::default());
        // Nothing running: no wait.
        schedule.wait_if_running().await;
        assert!(schedule.try_start(1, Instant::now()));
        let waiter = tokio::spawn({
            let schedule = schedule.clone();
            async move { schedule.wait_if_running().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        schedule.finish(true, &BACKOFF);
        waiter.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_refresh_pauses_with_growing_backoff() {
        let schedule = RefreshAheadSchedule::default();
        assert!(schedule.try_start(1, Instant::now()));
        assert_eq!(
            schedule.finish(false, &BACKOFF),
            Some(Duration::from_secs(1))
        );
        assert!(!schedule.try_start(1, Instant::now()), "paused");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            schedule.try_start(1, Instant::now()),
            "same token, after the pause"
        );
        assert_eq!(
            schedule.finish(false, &BACKOFF),
            Some(Duration::from_secs(2))
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(schedule.try_start(1, Instant::now()));
        assert_eq!(schedule.finish(true, &BACKOFF), None);
        assert!(
            schedule.try_start(2, Instant::now()),
            "success resets the pause"
        );
    }
}
