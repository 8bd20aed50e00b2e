//! Tokens an upstream rejected: never handed out again, from any source.
//!
//! Tokens are known by their [`id`](crate::token::Token::id), which derives
//! from their value, so a rejected token read back from a file or the shared
//! store is recognised. The set is bounded; an entry is forgotten when its
//! token expires (an expired token is never handed out anyway), and when
//! the set is full the entry that expires first makes room.

use tokio::time::Instant;

/// How many rejected tokens are remembered at most.
pub(crate) const REJECTED_TOKENS_CAPACITY: usize = 64;

/// A bounded set of rejected token ids.
#[derive(Debug, Default)]
pub(super) struct RejectedTokens {
    /// `(token id, when the token expires)`, unordered.
    entries: Vec<(u64, Instant)>,
}

impl RejectedTokens {
    /// Remembers token `id`, which expires at `expires_at`.
    pub(super) fn insert(&mut self, id: u64, expires_at: Instant, now: Instant) {
        self.entries.retain(|&(_, expiry)| expiry > now);
        if let Some(entry) = self.entries.iter_mut().find(|(known, _)| *known == id) {
            entry.1 = entry.1.max(expires_at);
            return;
        }
        if self.entries.len() >= REJECTED_TOKENS_CAPACITY
            && let Some(first) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, expiry))| *expiry)
                .map(|(i, _)| i)
        {
            self.entries.swap_remove(first);
        }
        self.entries.push((id, expires_at));
    }

    /// Whether token `id` was rejected and has not expired by `now`.
    pub(super) fn contains(&self, id: u64, now: Instant) -> bool {
        self.entries
            .iter()
            .any(|&(known, expiry)| known == id && expiry > now)
    }

    /// How many entries are held (expired ones included until the next
    /// insert).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn remembers_until_expiry() {
        let mut set = RejectedTokens::default();
        let now = Instant::now();
        set.insert(7, now + Duration::from_secs(10), now);
        assert!(set.contains(7, now));
        assert!(!set.contains(8, now));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!set.contains(7, Instant::now()), "forgotten at its expiry");
        set.insert(8, Instant::now() + Duration::from_secs(1), Instant::now());
        assert_eq!(set.len(), 1, "expired entries are dropped on insert");
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_and_the_soonest_to_expire_makes_room() {
        let mut set = RejectedTokens::default();
        let now = Instant::now();
        for id in 0..REJECTED_TOKENS_CAPACITY as u64 {
            set.insert(id, now + Duration::from_secs(100 + id), now);
        }
        set.insert(1000, now + Duration::from_secs(5000), now);
        assert_eq!(set.len(), REJECTED_TOKENS_CAPACITY);
        assert!(!set.contains(0, now), "the first to expire left");
        assert!(set.contains(1, now) && set.contains(1000, now));
        // Inserting a known id does not grow the set.
        set.insert(1000, now + Duration::from_secs(6000), now);
        assert_eq!(set.len(), REJECTED_TOKENS_CAPACITY);
        assert!(set.contains(1000, now + Duration::from_secs(5500)));
    }
}
