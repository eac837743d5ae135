//! Warm-up that neither crawls nor hammers. After a restart every mailbox
//! logs in at once: thousands of TLS handshakes and logins would pile onto
//! one server in the same second, and Gmail throttles bursts of logins (see
//! `docs/provider-wire-facts.md`: `[THROTTLED]`, "Too many simultaneous
//! connections"). Every IMAP login passes this gate: a bounded number are
//! under way at once, and each server receives them no faster than its
//! pace, evenly spaced.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

/// One server however its name is written (any case, a trailing dot).
fn server_key(host: &str, port: u16) -> String {
    format!("{}:{port}", host.trim_end_matches('.').to_ascii_lowercase())
}

/// Past this many servers remembered, those whose turns passed are dropped.
const FORGET_PAST_TURNS_AT: usize = 1_024;

/// Keeps one login's place until it is done (dropped).
pub struct Admitted {
    _slot: Option<OwnedSemaphorePermit>,
}

#[derive(Clone)]
pub struct LoginGate {
    slots: Arc<Semaphore>,
    /// Per server (host:port, lower-case): when its next login may start.
    next_start: Arc<Mutex<HashMap<String, Instant>>>,
    /// Logins per second for servers with a pace of their own (provider presets).
    paces: Arc<HashMap<String, u32>>,
    default_pace: u32,
}

impl LoginGate {
    /// `concurrent` logins at most under way; `paces` for named servers,
    /// `default_pace` logins per second for any other server.
    pub fn new(concurrent: usize, paces: HashMap<(String, u16), u32>, default_pace: u32) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(concurrent.max(1))),
            next_start: Arc::default(),
            paces: Arc::new(
                paces
                    .into_iter()
                    .map(|((host, port), pace)| (server_key(&host, port), pace))
                    .collect(),
            ),
            default_pace,
        }
    }

    /// No limit: for tools and tests that log in once.
    pub fn unlimited() -> Self {
        Self::new(Semaphore::MAX_PERMITS, HashMap::new(), 0)
    }

    /// Waits for the server's turn, then for a slot. The turn comes first,
    /// so logins waiting for a paced server hold no slot that another
    /// server's logins could use.
    pub async fn admit(&self, host: &str, port: u16) -> Admitted {
        let server = server_key(host, port);
        let pace = self
            .paces
            .get(&server)
            .copied()
            .unwrap_or(self.default_pace);
        if pace > 0 {
            let spacing = Duration::from_secs(1) / pace;
            let start = {
                let mut next_start = self
                    .next_start
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let now = Instant::now();
                // Servers whose turns all passed need no memory: the map
                // stays as small as the set of servers logged in to lately.
                if next_start.len() >= FORGET_PAST_TURNS_AT {
                    next_start.retain(|_, next| *next > now);
                }
                let start = next_start.get(&server).map_or(now, |&next| next.max(now));
                next_start.insert(server, start + spacing);
                start
            };
            tokio::time::sleep_until(start).await;
        }
        // The semaphore is never closed; were it, the login goes ahead unbounded.
        let slot = self.slots.clone().acquire_owned().await.ok();
        Admitted { _slot: slot }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn logins_to_one_server_are_spaced_by_its_pace_and_others_are_not_held() {
        let gate = LoginGate::new(
            100,
            HashMap::from([(("imap.gmail.com".into(), 993), 10)]),
            1_000,
        );
        let started = Instant::now();
        for _ in 0..5 {
            drop(gate.admit("IMAP.gmail.com.", 993).await);
        }
        // The first goes at once, each next 100 ms later.
        assert_eq!(started.elapsed(), Duration::from_millis(400));
        let started = Instant::now();
        drop(gate.admit("mail.example.test", 993).await);
        assert!(started.elapsed() < Duration::from_millis(2));
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_logins_than_the_slots_are_under_way_at_once() {
        let gate = LoginGate::new(2, HashMap::new(), 0);
        let first = gate.admit("a.test", 993).await;
        let _second = gate.admit("b.test", 993).await;
        let third = tokio::spawn({
            let gate = gate.clone();
            async move { gate.admit("c.test", 993).await }
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!third.is_finished(), "a third login waits for a slot");
        drop(first);
        let _third = tokio::time::timeout(Duration::from_secs(1), third)
            .await
            .expect("the third login goes once a slot is free");
    }
}
