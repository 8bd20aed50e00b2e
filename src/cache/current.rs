//! [`CurrentSlot`]: where a cache keeps the token it hands out, read on
//! the hit path without a locked operation.
//!
//! An `ArcSwap` guard costs two locked operations per read (taking a debt
//! slot and paying it back). So each thread also keeps its own copy of the
//! token it last read from each slot, and every write to a slot gets a
//! stamp no other write in the process gets. A read compares the slot's
//! stamp with its copy's (one plain load) and reloads only when they
//! differ, that is once per thread after each new token.
//!
//! A copy is loaded after its stamp is read, and every write stores the
//! token before the new stamp, under the cache's rejections lock: a copy
//! whose stamp matches is the token written with that stamp or a later one
//! still being written. A thread never reads a copy older than a write it
//! has seen (its own, or one ordered before it by a lock or a channel).
//!
//! The copies live in a small per-thread table indexed by slot; slots that
//! share an entry only reload more often. A copy keeps its token alive
//! until that thread next reads a slot of that entry.

use std::{
    cell::RefCell,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use arc_swap::{ArcSwapOption, Guard};

use super::CurrentToken;

/// Entries in each thread's table of copies.
const COPIES: usize = 16;

/// The next stamp to hand out; 0 marks a thread's empty entry.
static NEXT_STAMP: AtomicU64 = AtomicU64::new(1);

/// Spreads slots over the entries of the per-thread tables.
static NEXT_ENTRY: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static THREAD_COPIES: RefCell<[ThreadCopy; COPIES]> =
        const { RefCell::new([const { ThreadCopy::EMPTY }; COPIES]) };
}

/// A thread's copy of a slot's token, with the stamp it was written with.
struct ThreadCopy {
    stamp: u64,
    current: Option<Arc<CurrentToken>>,
}

impl ThreadCopy {
    const EMPTY: Self = Self {
        stamp: 0,
        current: None,
    };
}

fn next_stamp() -> u64 {
    NEXT_STAMP.fetch_add(1, Ordering::Relaxed)
}

/// The token a cache hands out (`None`: none yet, or dropped), stamped on
/// every write.
pub(super) struct CurrentSlot {
    current: ArcSwapOption<CurrentToken>,
    stamp: AtomicU64,
    /// This slot's entry in every thread's table of copies.
    entry: usize,
}

impl CurrentSlot {
    pub(super) fn new() -> Self {
        Self {
            current: ArcSwapOption::empty(),
            stamp: AtomicU64::new(next_stamp()),
            entry: NEXT_ENTRY.fetch_add(1, Ordering::Relaxed) % COPIES,
        }
    }

    /// The token, read through an `ArcSwap` guard (off the hit path).
    pub(super) fn load(&self) -> Guard<Option<Arc<CurrentToken>>> {
        self.current.load()
    }

    /// The token, as its own `Arc` (off the hit path).
    pub(super) fn load_full(&self) -> Option<Arc<CurrentToken>> {
        self.current.load_full()
    }

    /// Makes `current` the token handed out. Callers hold the cache's
    /// rejections lock, so writes are ordered.
    pub(super) fn store(&self, current: Option<Arc<CurrentToken>>) {
        self.current.store(current);
        self.stamp.store(next_stamp(), Ordering::Release);
    }

    /// Empties the slot if it still holds `expected`; under the cache's
    /// rejections lock, as [`store`](Self::store).
    pub(super) fn clear_if(&self, expected: &Option<Arc<CurrentToken>>) {
        let previous = self.current.compare_and_swap(expected, None);
        if previous.as_ref().map(Arc::as_ptr) == expected.as_ref().map(Arc::as_ptr) {
            self.stamp.store(next_stamp(), Ordering::Release);
        }
    }

    /// The hit path: `f` gets the token from this thread's copy, reloaded
    /// first if the slot was written since.
    pub(super) fn with_current<R>(&self, f: impl FnOnce(Option<&Arc<CurrentToken>>) -> R) -> R {
        let stamp = self.stamp.load(Ordering::Acquire);
        let mut f = Some(f);
        let from_copy = THREAD_COPIES.try_with(|copies| {
            // Taken already only if `f` reads a slot itself.
            let mut copies = copies.try_borrow_mut().ok()?;
            let copy = &mut copies[self.entry];
            if copy.stamp != stamp {
                copy.current = self.current.load_full();
                copy.stamp = stamp;
            }
            f.take().map(|f| f(copy.current.as_ref()))
        });
        if let Ok(Some(result)) = from_copy {
            return result;
        }
        // The thread's table is gone (thread exit) or in use.
        let f = f.expect("f runs only when its result comes back");
        f(self.current.load().as_ref())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{cache::margins::Deadlines, secret::Secret, token::Token};

    fn current(name: &str) -> Arc<CurrentToken> {
        let token = Token::new(Secret::new(name), Duration::from_secs(3600));
        let deadlines = Deadlines::new(&token, Duration::from_secs(10), Duration::from_secs(300));
        Arc::new(CurrentToken {
            token: Arc::new(token),
            deadlines,
        })
    }

    fn id_seen(slot: &CurrentSlot) -> Option<u64> {
        slot.with_current(|c| c.map(|c| c.token.id()))
    }

    #[test]
    fn every_write_is_seen_by_the_next_read() {
        let slot = CurrentSlot::new();
        assert_eq!(id_seen(&slot), None);
        let first = current("first");
        slot.store(Some(Arc::clone(&first)));
        assert_eq!(id_seen(&slot), Some(first.token.id()));
        let second = current("second");
        slot.store(Some(Arc::clone(&second)));
        assert_eq!(id_seen(&slot), Some(second.token.id()));
        slot.clear_if(&Some(second));
        assert_eq!(id_seen(&slot), None);
    }

    #[test]
    fn clearing_a_token_no_longer_there_changes_nothing() {
        let slot = CurrentSlot::new();
        let (old, new) = (current("old"), current("new"));
        slot.store(Some(Arc::clone(&new)));
        assert_eq!(id_seen(&slot), Some(new.token.id()));
        slot.clear_if(&Some(old));
        assert_eq!(id_seen(&slot), Some(new.token.id()));
    }

    #[test]
    fn slots_sharing_a_thread_entry_each_see_their_own_token() {
        // More slots than entries: some share one.
        let slots: Vec<_> = (0..COPIES * 2 + 1)
            .map(|i| {
                let slot = CurrentSlot::new();
                slot.store(Some(current(&format!("token-{i}"))));
                slot
            })
            .collect();
        for _ in 0..2 {
            for slot in &slots {
                let expected = slot.load().as_ref().map(|c| c.token.id());
                assert_eq!(id_seen(slot), expected);
            }
        }
    }

    #[test]
    fn a_write_on_another_thread_is_seen_after_it() {
        let slot = Arc::new(CurrentSlot::new());
        let first = current("first");
        slot.store(Some(Arc::clone(&first)));
        assert_eq!(id_seen(&slot), Some(first.token.id()));
        let second = current("second");
        std::thread::scope(|s| {
            s.spawn(|| slot.store(Some(Arc::clone(&second))));
        });
        assert_eq!(id_seen(&slot), Some(second.token.id()));
        std::thread::scope(|s| {
            s.spawn(|| slot.clear_if(&Some(Arc::clone(&second))));
        });
        assert_eq!(id_seen(&slot), None);
    }

    #[test]
    fn a_read_inside_a_read_falls_back_to_the_guard() {
        let (outer, inner) = (CurrentSlot::new(), CurrentSlot::new());
        let (a, b) = (current("a"), current("b"));
        outer.store(Some(Arc::clone(&a)));
        inner.store(Some(Arc::clone(&b)));
        let seen = outer.with_current(|c| (c.map(|c| c.token.id()), id_seen(&inner)));
        assert_eq!(seen, (Some(a.token.id()), Some(b.token.id())));
    }
}
