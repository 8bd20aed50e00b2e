//! How much of a token's life is used: margins that scale with its
//! lifetime.
//!
//! The configured `expiry_margin` (default 10 s) and `refresh_before_expiry`
//! (default 5 min) suit hour-long tokens; a token that lives 4 s would be
//! unusable on arrival under them. So each is capped by the token's own
//! lifetime `L` (the lifetime it was issued with where known, else what it
//! had left when this process got it):
//!
//! * **expiry margin** = `min(expiry_margin, L / 4)`: a token is handed out
//!   only while it has more than this left;
//! * **refresh window** = `min(refresh_before_expiry, L / 2)`: inside it one
//!   background refresh runs while callers keep the current token.
//!
//! Whatever its lifetime, a token is thus refreshed no earlier than half-way
//! through its life and stays usable for at least three quarters of it:
//! 2 s tokens are refreshed about once a second, 12 h tokens five minutes
//! before they expire. A token that arrives with less than
//! [`MIN_USABLE_LIFETIME`] to live, or with no more than its margin left, is
//! unusable: a remembered failure (`ExpiredOnArrival`), never a fetch loop.

use std::time::Duration;

use tokio::time::Instant;

use crate::token::Token;

/// Below this a token is unusable whatever the margins say: refreshing it
/// would amount to a fetch per request.
pub const MIN_USABLE_LIFETIME: Duration = Duration::from_secs(1);

/// The expiry margin for a token of `lifetime`, given the configured one.
pub fn scaled_expiry_margin(configured: Duration, lifetime: Duration) -> Duration {
    configured.min(lifetime / 4)
}

/// The refresh window for a token of `lifetime`, given the configured one.
pub fn scaled_refresh_window(configured: Duration, lifetime: Duration) -> Duration {
    configured.min(lifetime / 2)
}

/// The points in a token's life where the cache changes its mind about it,
/// computed once when it is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Deadlines {
    /// From here on the token is not handed out (expiry minus the margin).
    pub(super) usable_until: Instant,
    /// From here on a background refresh is due (expiry minus the window).
    pub(super) refresh_from: Instant,
    /// The scaled expiry margin.
    pub(super) margin: Duration,
}

impl Deadlines {
    pub(super) fn new(token: &Token, expiry_margin: Duration, refresh_window: Duration) -> Self {
        let lifetime = token.lifetime();
        let margin = scaled_expiry_margin(expiry_margin, lifetime);
        let window = scaled_refresh_window(refresh_window, lifetime);
        let expires = token.expires_at();
        let before = |d: Duration| expires.checked_sub(d).unwrap_or(expires);
        Self {
            usable_until: before(margin),
            refresh_from: before(window),
            margin,
        }
    }

    /// Whether the token may be handed out at `now`.
    pub(super) fn usable_at(&self, now: Instant) -> bool {
        now < self.usable_until
    }

    /// Whether a token that has just arrived can be used at all.
    pub(super) fn usable_on_arrival(&self, token: &Token, now: Instant) -> bool {
        token.lifetime() >= MIN_USABLE_LIFETIME && self.usable_at(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    const MARGIN: Duration = Duration::from_secs(10);
    const WINDOW: Duration = Duration::from_secs(300);

    #[test]
    fn margins_follow_the_documented_rule() {
        let secs = Duration::from_secs;
        for (lifetime, margin, window) in [
            (secs(2), Duration::from_millis(500), secs(1)),
            (secs(4), secs(1), secs(2)),
            (secs(30), Duration::from_millis(7500), secs(15)),
            (secs(3600), secs(10), secs(300)),
            (secs(12 * 3600), secs(10), secs(300)),
        ] {
            assert_eq!(
                scaled_expiry_margin(MARGIN, lifetime),
                margin,
                "{lifetime:?}"
            );
            assert_eq!(
                scaled_refresh_window(WINDOW, lifetime),
                window,
                "{lifetime:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_of_a_short_token() {
        let token = Token::new(Secret::new("t"), Duration::from_secs(4));
        let now = Instant::now();
        let d = Deadlines::new(&token, MARGIN, WINDOW);
        assert_eq!(d.usable_until, now + Duration::from_secs(3));
        assert_eq!(d.refresh_from, now + Duration::from_secs(2));
        assert!(d.usable_on_arrival(&token, now));
        assert!(!d.usable_at(now + Duration::from_secs(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_that_cannot_serve_are_unusable_on_arrival() {
        let now = Instant::now();
        for lifetime in [Duration::ZERO, Duration::from_millis(999)] {
            let token = Token::new(Secret::new("t"), lifetime);
            let d = Deadlines::new(&token, MARGIN, WINDOW);
            assert!(!d.usable_on_arrival(&token, now), "{lifetime:?}");
        }
        let token = Token::new(Secret::new("t"), MIN_USABLE_LIFETIME);
        assert!(Deadlines::new(&token, MARGIN, WINDOW).usable_on_arrival(&token, now));
    }
}
