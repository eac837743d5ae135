//! Work that holds a thread (parsing a large message, fsync) without stalling
//! the async workers: the runtime hands this worker's other tasks to another
//! thread meanwhile. Unlike `spawn_blocking`, the work stays part of the
//! calling task, so a cancelled task never finishes it later behind its
//! caller's back.

/// Runs `work` where blocking is allowed. On a current-thread runtime (tests)
/// or outside one, it simply runs.
pub fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// Issue 7 item 12: with a single worker, a task still runs while
    /// another one blocks in `blocking`. The blocked closure waits for that
    /// task's message, so without the hand-over it times out.
    #[test]
    fn other_tasks_run_while_one_blocks() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let received = runtime.block_on(async {
            let (tx, rx) = std::sync::mpsc::channel::<&str>();
            let (started_tx, started) = tokio::sync::oneshot::channel();
            let blocked = tokio::spawn(async move {
                let _ = started_tx.send(());
                // Nested, as a store flush inside a message's handling is.
                super::blocking(|| super::blocking(|| rx.recv_timeout(Duration::from_secs(5))))
            });
            // The blocked task holds the only worker before the other is spawned.
            started.await.unwrap();
            let other = tokio::spawn(async move { tx.send("ran meanwhile") });
            let received = blocked.await.unwrap();
            let _ = other.await;
            received
        });
        assert_eq!(received, Ok("ran meanwhile"));
    }
}
