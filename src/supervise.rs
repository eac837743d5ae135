//! Keeping the daemon's long-running workers alive: a worker that ends
//! without being asked to (a panic, a bug) is logged, counted in `/metrics`,
//! started again with backoff, and reported by `/readyz` while it is down.

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

/// Which core workers are down right now.
#[derive(Clone, Debug, Default)]
pub struct Health {
    down: Arc<Mutex<BTreeSet<&'static str>>>,
}

impl Health {
    fn set(&self, worker: &'static str, up: bool) {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        if up {
            down.remove(worker);
        } else {
            down.insert(worker);
        }
    }

    /// The workers that are down, by name.
    pub fn down(&self) -> Vec<&'static str> {
        let down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        down.iter().copied().collect()
    }
}

/// Runs the worker `start` makes until `shutdown`; whenever it ends before
/// that, waits (1 s, doubling to a minute) and starts a new one.
pub async fn supervise<F, W>(
    worker: &'static str,
    health: Health,
    shutdown: CancellationToken,
    mut start: F,
) where
    F: FnMut() -> W,
    W: Future<Output = ()> + Send + 'static,
{
    let mut crashes: u32 = 0;
    loop {
        let ended = tokio::spawn(start()).await;
        if shutdown.is_cancelled() {
            return;
        }
        health.set(worker, false);
        let wait = crate::backoff::delay(crashes, Duration::from_secs(1), Duration::from_secs(60));
        crashes = crashes.saturating_add(1);
        match ended {
            Err(err) => tracing::error!("the {worker} crashed, restarting it in {wait:?}: {err}"),
            Ok(()) => {
                crate::panics::note_unexpected_end(worker);
                tracing::error!("the {worker} stopped by itself, restarting it in {wait:?}");
            }
        }
        metrics::counter!("mailbridge_worker_restarts_total", "worker" => worker).increment(1);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return,
        }
        health.set(worker, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn a_worker_that_panics_is_reported_down_and_started_again() {
        let health = Health::default();
        let shutdown = CancellationToken::new();
        let starts = Arc::new(AtomicU32::new(0));
        let (ran_again, mut second_start) = tokio::sync::mpsc::channel::<()>(1);
        let supervisor = tokio::spawn(supervise(
            "test worker",
            health.clone(),
            shutdown.clone(),
            {
                let starts = starts.clone();
                let shutdown = shutdown.clone();
                move || {
                    let n = starts.fetch_add(1, Ordering::SeqCst);
                    let (shutdown, ran_again) = (shutdown.clone(), ran_again.clone());
                    async move {
                        if n == 0 {
                            panic!("a bug");
                        }
                        let _ = ran_again.send(()).await;
                        shutdown.cancelled().await;
                    }
                }
            },
        ));
        second_start
            .recv()
            .await
            .expect("started again after the panic");
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        assert!(health.down().is_empty(), "up again");
        shutdown.cancel();
        supervisor.await.expect("the supervisor ends at shutdown");
    }

    #[test]
    fn down_workers_are_listed() {
        let health = Health::default();
        health.set("send queue", false);
        assert_eq!(health.down(), ["send queue"]);
        health.set("send queue", true);
        assert!(health.down().is_empty());
    }
}
