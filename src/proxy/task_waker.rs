//! [`TaskWaker`]: the waker of the task that should hear of a wake-up now,
//! for wakers that stand between a resource and that task.

use std::{
    sync::{Mutex, MutexGuard, PoisonError},
    task::Waker,
};

/// The task to wake, kept up to date by the task at each poll.
#[derive(Default)]
pub(super) struct TaskWaker(Mutex<Option<Waker>>);

impl TaskWaker {
    /// `waker`'s task is the one to wake from now on (no clone when it
    /// already is).
    pub(super) fn set(&self, waker: &Waker) {
        let mut task = self.slot();
        if !task.as_ref().is_some_and(|t| t.will_wake(waker)) {
            *task = Some(waker.clone());
        }
    }

    /// No task is woken until the next `set`.
    pub(super) fn clear(&self) {
        *self.slot() = None;
    }

    /// Wakes the task, if there is one; the lock is not held meanwhile.
    pub(super) fn wake(&self) {
        let task = self.slot().clone();
        if let Some(task) = task {
            task.wake();
        }
    }

    fn slot(&self) -> MutexGuard<'_, Option<Waker>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
