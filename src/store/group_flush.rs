//! Group commit: many writers, one fsync. A writer that asks for durability
//! while a flush is under way waits for the next flush instead of starting
//! its own; that flush starts after the writer's writes, so it covers them.
//! With N mailboxes committing at once, the disk sees one flush per round
//! instead of N, and no writer is told "durable" before it is.

use std::sync::{Condvar, Mutex};

#[derive(Default)]
pub struct GroupFlush {
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Default)]
struct State {
    /// Tickets handed out: one per request, in order.
    requested: u64,
    /// Every ticket up to this one is durable.
    completed: u64,
    flushing: bool,
    /// Flushes run, for tests and metrics.
    flushes: u64,
}

impl GroupFlush {
    /// Returns once a flush that started after this call's writes has
    /// finished. `flush` is the storage's own (an fsync); its error goes to
    /// the caller whose flush failed, and the others try again.
    pub fn flush<E>(&self, flush: impl Fn() -> Result<(), E>) -> Result<(), E> {
        let mut state = self.lock();
        state.requested += 1;
        let ticket = state.requested;
        loop {
            if state.completed >= ticket {
                return Ok(());
            }
            if state.flushing {
                state = self
                    .done
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                continue;
            }
            // Every ticket up to here was taken after its writes were made.
            let covers = state.requested;
            state.flushing = true;
            drop(state);
            // Should `flush` panic, the others must not wait for it forever.
            let running = Running(self);
            let result = flush();
            std::mem::forget(running);
            state = self.lock();
            state.flushing = false;
            state.flushes += 1;
            if result.is_ok() {
                state.completed = state.completed.max(covers);
            }
            self.done.notify_all();
            result?;
        }
    }

    /// Durability requests so far.
    #[cfg(test)]
    fn requested(&self) -> u64 {
        self.lock().requested
    }

    /// Flushes run so far.
    pub fn flushes(&self) -> u64 {
        self.lock().flushes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Ends a flush that unwound: the next writer flushes instead.
struct Running<'a>(&'a GroupFlush);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.flushing = false;
        self.0.done.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc, Barrier,
            atomic::{AtomicU64, Ordering},
        },
        time::Duration,
    };

    use super::*;

    #[test]
    fn writers_that_ask_together_share_flushes_and_each_is_covered() {
        let group = Arc::new(GroupFlush::default());
        // What the "disk" holds: the highest write a flush saw.
        let written = Arc::new(AtomicU64::new(0));
        let durable = Arc::new(AtomicU64::new(0));
        let writers = 16;
        let barrier = Arc::new(Barrier::new(writers));
        let handles: Vec<_> = (1..=writers as u64)
            .map(|n| {
                let (group, written, durable, barrier) = (
                    group.clone(),
                    written.clone(),
                    durable.clone(),
                    barrier.clone(),
                );
                std::thread::spawn(move || {
                    barrier.wait();
                    written.fetch_max(n, Ordering::SeqCst);
                    let seen_at_write = n;
                    group
                        .flush(|| {
                            // The flush under way lasts until every writer
                            // has asked: they all queue behind it.
                            let deadline = std::time::Instant::now() + Duration::from_secs(10);
                            while group.requested() < writers as u64
                                && std::time::Instant::now() < deadline
                            {
                                std::thread::yield_now();
                            }
                            durable.fetch_max(written.load(Ordering::SeqCst), Ordering::SeqCst);
                            Ok::<_, ()>(())
                        })
                        .unwrap();
                    // Told durable: a flush that saw this write has finished.
                    assert!(durable.load(Ordering::SeqCst) >= seen_at_write);
                })
            })
            .collect();
        for handle in handles {
            handle.join().unwrap();
        }
        // The first flush, then one for everyone who queued behind it.
        let flushes = group.flushes();
        assert!(flushes <= 2, "{flushes} flushes for {writers} writers");
    }

    #[test]
    fn a_failed_flush_is_the_callers_error_and_the_next_one_tries_again() {
        let group = GroupFlush::default();
        assert_eq!(group.flush(|| Err::<(), _>("disk full")), Err("disk full"));
        assert_eq!(group.flush(|| Ok::<_, &str>(())), Ok(()));
        assert_eq!(group.flushes(), 2);
    }

    #[test]
    fn a_flush_that_panics_does_not_hold_the_others() {
        let group = GroupFlush::default();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            group.flush(|| -> Result<(), ()> { panic!("the disk went away") })
        }));
        assert!(panicked.is_err());
        assert_eq!(group.flush(|| Ok::<_, ()>(())), Ok(()));
    }
}
