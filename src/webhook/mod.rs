//! Delivers the outbox to the CRM's webhooks: signed (Standard Webhooks), at least
//! once, retried with backoff, one at a time per ordering key (thread) so the CRM
//! sees each thread in order, many threads in parallel.

pub mod signing;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use chrono::Utc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::{
    backoff,
    config::{DeliveryConfig, WebhookConfig},
    store::{OutboxEntry, Store},
};
use signing::SigningKey;

#[derive(Clone, Debug)]
struct Endpoint {
    url: String,
    key: SigningKey,
}

/// Wakes the delivery worker when something was queued.
pub type OutboxSignal = crate::wakeup::Wakeup;

#[derive(Clone)]
pub struct Deliverer {
    store: Arc<dyn Store>,
    endpoints: Arc<Vec<Endpoint>>,
    http: reqwest::Client,
    config: DeliveryConfig,
    signal: OutboxSignal,
}

impl Deliverer {
    pub fn new(
        store: Arc<dyn Store>,
        webhooks: &[WebhookConfig],
        http: reqwest::Client,
        config: DeliveryConfig,
        signal: OutboxSignal,
    ) -> anyhow::Result<Self> {
        let endpoints = webhooks
            .iter()
            .map(|w| {
                Ok(Endpoint {
                    url: w.url.clone(),
                    key: SigningKey::from_secret(&w.secret)?,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            store,
            endpoints: Arc::new(endpoints),
            http,
            config,
            signal,
        })
    }

    pub async fn run(self, shutdown: CancellationToken) {
        if self.endpoints.is_empty() {
            tracing::warn!("no webhook configured: events stay in the outbox until one is");
            shutdown.cancelled().await;
            return;
        }
        let mut in_flight: JoinSet<()> = JoinSet::new();
        let mut tasks = InFlight::default();
        loop {
            let next_due = match self.start_due(&mut in_flight, &mut tasks) {
                Ok(next_due) => next_due,
                Err(err) => {
                    tracing::error!("reading the outbox failed: {err:#}");
                    Some(Duration::from_secs(1))
                }
            };
            let sleep = next_due.unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.signal.notified() => {}
                Some(done) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                    let id = match done {
                        Ok((id, ())) => id,
                        Err(err) => {
                            tracing::error!("a webhook attempt crashed (it will be retried): {err}");
                            err.id()
                        }
                    };
                    tasks.finished(id);
                }
                _ = tokio::time::sleep(sleep) => {}
            }
        }
        // Attempts under way finish (they are short and bounded by the HTTP
        // timeout) so that an acknowledged event is recorded as such.
        while in_flight.join_next().await.is_some() {}
    }

    /// Starts what is deliverable (up to the concurrency) and returns when
    /// the next entry falls due. The store's due index answers in what it
    /// returns, however long the backlog.
    fn start_due(
        &self,
        in_flight: &mut JoinSet<()>,
        tasks: &mut InFlight,
    ) -> anyhow::Result<Option<Duration>> {
        let now = Utc::now().timestamp_millis();
        let free = self.config.concurrency.saturating_sub(in_flight.len());
        let due = self
            .store
            .outbox_due(now, free, &|sequence| tasks.sequences.contains(&sequence))?;
        metrics::gauge!("mailbridge_outbox_pending").set(due.pending as f64);
        let mut next_due = due.next_due_ms;
        for (sequence, entry) in due.entries {
            let key = entry.event.ordering_key.clone();
            // An entry that overtook an in-flight one of its thread (two
            // commits at once) waits for it: one attempt per thread at a time.
            if tasks.keys.contains(&key) {
                next_due = Some(next_due.map_or(now + 1_000, |d| d.min(now + 1_000)));
                continue;
            }
            let attempt = Attempt {
                store: self.store.clone(),
                endpoints: self.endpoints.clone(),
                http: self.http.clone(),
                config: self.config.clone(),
            };
            let handle = in_flight.spawn(attempt.deliver(sequence, entry));
            tasks.started(handle.id(), key, sequence);
        }
        Ok(next_due.map(|due| Duration::from_millis(u64::try_from(due - now).unwrap_or(0))))
    }
}

/// The attempts under way: their thread (one at a time each) and sequence.
#[derive(Default)]
struct InFlight {
    by_task: HashMap<tokio::task::Id, (String, u64)>,
    keys: HashSet<String>,
    sequences: HashSet<u64>,
}

impl InFlight {
    fn started(&mut self, id: tokio::task::Id, key: String, sequence: u64) {
        self.keys.insert(key.clone());
        self.sequences.insert(sequence);
        self.by_task.insert(id, (key, sequence));
    }

    fn finished(&mut self, id: tokio::task::Id) {
        if let Some((key, sequence)) = self.by_task.remove(&id) {
            self.keys.remove(&key);
            self.sequences.remove(&sequence);
        }
    }
}

/// Whether an event that keeps failing is set aside: `give_up_after_hours`
/// after its first failed attempt (an event that waited for a webhook to be
/// configured, or behind a long outage of its thread, gets its full time).
fn gives_up(entry: &OutboxEntry, now_ms: i64, give_up_after_hours: u64) -> bool {
    let limit_ms = i64::try_from(give_up_after_hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX);
    let first_failed = entry.first_failed_ms.unwrap_or(now_ms);
    now_ms.saturating_sub(first_failed) >= limit_ms
}

struct Attempt {
    store: Arc<dyn Store>,
    endpoints: Arc<Vec<Endpoint>>,
    http: reqwest::Client,
    config: DeliveryConfig,
}

impl Attempt {
    async fn deliver(self, sequence: u64, mut entry: OutboxEntry) {
        let body = match serde_json::to_vec(&entry.event.body()) {
            Ok(body) => body,
            Err(err) => {
                tracing::error!(event = %entry.event.id, "event cannot be serialized, set aside: {err:#}");
                entry.last_error = Some(err.to_string());
                let _ = self.store.bury_outbox(sequence, &entry);
                return;
            }
        };
        let mut failure = None;
        for endpoint in self.endpoints.iter() {
            if entry.delivered_to.contains(&endpoint.url) {
                continue;
            }
            match self.post(endpoint, &entry.event.id, &body).await {
                Ok(()) => entry.delivered_to.push(endpoint.url.clone()),
                Err(err) => failure = Some(format!("{}: {err}", endpoint.url)),
            }
        }
        let outcome = match failure {
            None => {
                metrics::counter!("mailbridge_webhooks_delivered_total").increment(1);
                self.store.complete_outbox(sequence)
            }
            Some(error) => {
                metrics::counter!("mailbridge_webhook_failures_total").increment(1);
                let now_ms = Utc::now().timestamp_millis();
                entry.attempts += 1;
                entry.last_error = Some(error.clone());
                entry.first_failed_ms.get_or_insert(now_ms);
                if gives_up(&entry, now_ms, self.config.give_up_after_hours) {
                    tracing::error!(event = %entry.event.id, attempts = entry.attempts, "webhook still failing after {}h, set aside as a dead letter: {error}", self.config.give_up_after_hours);
                    metrics::counter!("mailbridge_dead_letters_total").increment(1);
                    self.store.bury_outbox(sequence, &entry)
                } else {
                    let wait = backoff::delay(
                        entry.attempts - 1,
                        Duration::from_millis(self.config.retry_min_ms),
                        Duration::from_millis(self.config.retry_max_ms),
                    );
                    tracing::warn!(event = %entry.event.id, attempts = entry.attempts, "webhook delivery failed, retrying in {wait:?}: {error}");
                    entry.next_attempt_ms = Utc::now().timestamp_millis()
                        + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
                    self.store.update_outbox(sequence, &entry)
                }
            }
        };
        if let Err(err) = outcome {
            tracing::error!(event = %entry.event.id, "recording the delivery outcome failed (it will be retried): {err:#}");
        }
    }

    async fn post(&self, endpoint: &Endpoint, id: &str, body: &[u8]) -> Result<(), String> {
        let timestamp = Utc::now().timestamp();
        let response = self
            .http
            .post(&endpoint.url)
            .timeout(Duration::from_secs(self.config.timeout_secs))
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", endpoint.key.sign(id, timestamp, body))
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| format!("{e:#}"))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("nowhere");
            Err(format!(
                "answered {status} redirecting to {location}; redirects are not followed \
                 (the POST would arrive as a GET without its body): configure the final URL"
            ))
        } else {
            Err(format!("answered {status}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Event;

    #[test]
    fn the_give_up_clock_starts_at_the_first_failed_attempt() {
        let hour = 3_600_000;
        let now = 100 * hour;
        let mut entry = OutboxEntry::new(Event {
            id: "evt_1".into(),
            kind: "message.inbound".into(),
            // Created long ago (no webhook was configured then).
            timestamp: chrono::DateTime::from_timestamp_millis(now - 80 * hour).unwrap(),
            ordering_key: "thr".into(),
            data: serde_json::json!({}),
        });
        entry.first_failed_ms = Some(now);
        assert!(
            !gives_up(&entry, now, 72),
            "its first failure starts the clock"
        );
        assert!(!gives_up(&entry, now + 71 * hour, 72));
        assert!(gives_up(&entry, now + 72 * hour, 72));
        assert!(
            gives_up(&entry, now, 0),
            "0 hours: set aside at the first failure"
        );
    }
}
