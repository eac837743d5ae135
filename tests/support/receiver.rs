//! A webhook receiver on port 0 that verifies Standard Webhooks signatures and
//! records every request, like Svix's TestReceiver.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use axum::{Router, body::Bytes, extract::State, http::HeaderMap, http::StatusCode, routing::post};
use mailbridge::webhook::signing::SigningKey;

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[derive(Clone, Debug)]
pub struct Received {
    pub webhook_id: String,
    pub signature_valid: bool,
    pub body: serde_json::Value,
    /// Whether the receiver acknowledged it (2xx).
    pub accepted: bool,
}

impl Received {
    pub fn kind(&self) -> &str {
        self.body["type"].as_str().unwrap_or("")
    }
    pub fn data(&self) -> &serde_json::Value {
        &self.body["data"]
    }
    pub fn subject(&self) -> &str {
        self.body["data"]["subject"].as_str().unwrap_or("")
    }
}

#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    log: Arc<Mutex<Vec<Received>>>,
    failing: Arc<AtomicBool>,
}

#[derive(Clone)]
struct ReceiverState {
    log: Arc<Mutex<Vec<Received>>>,
    failing: Arc<AtomicBool>,
    key: SigningKey,
}

async fn hook(State(state): State<ReceiverState>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let webhook_id = header("webhook-id");
    let timestamp: i64 = header("webhook-timestamp").parse().unwrap_or(0);
    let signature_valid =
        state
            .key
            .verify(&webhook_id, timestamp, &body, &header("webhook-signature"));
    let accepted = !state.failing.load(Ordering::SeqCst);
    let body = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    state.log.lock().unwrap().push(Received {
        webhook_id,
        signature_valid,
        body,
        accepted,
    });
    if accepted {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    }
}

impl Receiver {
    pub async fn start() -> Receiver {
        let log = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(AtomicBool::new(false));
        let state = ReceiverState {
            log: log.clone(),
            failing: failing.clone(),
            key: SigningKey::from_secret(SECRET).unwrap(),
        };
        let app = Router::new().route("/hook", post(hook)).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { url, log, failing }
    }

    /// Answer 500 to everything (`true`) or acknowledge again (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    pub fn all(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }

    /// Every acknowledged request, in arrival order.
    pub fn accepted(&self) -> Vec<Received> {
        self.all().into_iter().filter(|r| r.accepted).collect()
    }

    /// Waits for an acknowledged event matching `pred`.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&Received) -> bool) -> Received {
        super::eventually(what, super::DEADLINE, async || {
            self.accepted().into_iter().find(|r| pred(r))
        })
        .await
    }

    /// Waits until `n` acknowledged events match `pred`.
    pub async fn wait_for_count(
        &self,
        what: &str,
        n: usize,
        pred: impl Fn(&Received) -> bool,
    ) -> Vec<Received> {
        super::eventually(what, super::DEADLINE * 2, async || {
            let found: Vec<Received> = self.accepted().into_iter().filter(|r| pred(r)).collect();
            (found.len() >= n).then_some(found)
        })
        .await
    }
}
