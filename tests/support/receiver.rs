//! A webhook receiver on port 0 that verifies Standard Webhooks signatures and
//! records every request, like Svix's TestReceiver. It also checks every event
//! against the daemon's own OpenAPI document (`webhooks`), so each test that
//! receives events shows the document tells the truth about them; a receiver
//! that saw an event the document does not describe fails its test when it is
//! dropped. So does one that got a request whose signature does not verify
//! or whose body is no typed event.

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
    redirecting: Arc<AtomicBool>,
    redirected_gets: Arc<std::sync::atomic::AtomicUsize>,
    /// Requests that are no valid event: a signature that does not verify, a
    /// body that is no typed event, or one that differs from the OpenAPI
    /// document's `webhooks`.
    undocumented: Arc<Mutex<Vec<String>>>,
}

/// Why `body` is not what the document says its event type carries, if it is not.
fn undocumented(body: &serde_json::Value) -> Option<String> {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    static VALIDATORS: OnceLock<Mutex<HashMap<String, Result<jsonschema::Validator, String>>>> =
        OnceLock::new();
    let kind = body["type"].as_str()?.to_string();
    let validators = VALIDATORS.get_or_init(Default::default);
    let mut validators = validators.lock().unwrap();
    let validator = validators.entry(kind.clone()).or_insert_with(|| {
        let mut schema = serde_json::to_value(mailbridge::api::openapi::document()).unwrap();
        // The whole document is the root, so its `#/components/...`
        // references resolve; validation starts at the event's body schema.
        let pointer = format!(
            "#/webhooks/{}/post/requestBody/content/application~1json/schema",
            kind.replace('~', "~0").replace('/', "~1")
        );
        schema["$ref"] = pointer.into();
        schema.as_object_mut().unwrap().remove("$schema");
        jsonschema::validator_for(&schema)
            .map_err(|e| format!("no usable schema for webhook {kind:?} in the document: {e}"))
    });
    let validator = match validator {
        Ok(validator) => validator,
        Err(why) => return Some(why.clone()),
    };
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    (!errors.is_empty()).then(|| format!("{kind}: {}", errors.join("; ")))
}

/// A Standard Webhooks event: an object with a `type`, a `timestamp` and `data`.
fn is_typed_event(body: &serde_json::Value) -> bool {
    body["type"].as_str().is_some_and(|kind| !kind.is_empty())
        && body["timestamp"].is_string()
        && body.get("data").is_some()
}

#[derive(Clone)]
struct ReceiverState {
    log: Arc<Mutex<Vec<Received>>>,
    failing: Arc<AtomicBool>,
    redirecting: Arc<AtomicBool>,
    redirected_gets: Arc<std::sync::atomic::AtomicUsize>,
    key: SigningKey,
    undocumented: Arc<Mutex<Vec<String>>>,
}

/// Where a redirecting receiver sends requests: a client that follows the
/// redirect arrives here with a body-less GET.
async fn moved(State(state): State<ReceiverState>) -> StatusCode {
    state.redirected_gets.fetch_add(1, Ordering::SeqCst);
    StatusCode::OK
}

async fn hook(
    State(state): State<ReceiverState>,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
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
    let redirecting = state.redirecting.load(Ordering::SeqCst);
    let accepted = !state.failing.load(Ordering::SeqCst) && !redirecting;
    let raw = body;
    let body = serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null);
    let why = if !signature_valid {
        Some(format!(
            "a request whose signature does not verify (webhook-id {webhook_id:?})"
        ))
    } else if !is_typed_event(&body) {
        Some(format!(
            "a body that is no typed event: {}",
            String::from_utf8_lossy(&raw)
        ))
    } else {
        undocumented(&body)
    };
    if let Some(why) = why {
        state
            .undocumented
            .lock()
            .unwrap()
            .push(format!("{why}\n  in {body}"));
    }
    state.log.lock().unwrap().push(Received {
        webhook_id,
        signature_valid,
        body,
        accepted,
    });
    if redirecting {
        (StatusCode::FOUND, [("location", "/moved")]).into_response()
    } else if accepted {
        StatusCode::NO_CONTENT.into_response()
    } else {
        StatusCode::INTERNAL_SERVER_ERROR.into_response()
    }
}

impl Receiver {
    pub async fn start() -> Receiver {
        let log = Arc::new(Mutex::new(Vec::new()));
        let failing = Arc::new(AtomicBool::new(false));
        let redirecting = Arc::new(AtomicBool::new(false));
        let redirected_gets = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let undocumented = Arc::new(Mutex::new(Vec::new()));
        let state = ReceiverState {
            log: log.clone(),
            failing: failing.clone(),
            redirecting: redirecting.clone(),
            redirected_gets: redirected_gets.clone(),
            key: SigningKey::from_secret(SECRET).unwrap(),
            undocumented: undocumented.clone(),
        };
        let app = Router::new()
            .route("/hook", post(hook))
            .route("/moved", axum::routing::any(moved))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            url,
            log,
            failing,
            redirecting,
            redirected_gets,
            undocumented,
        }
    }

    /// Answer every POST with `302 Location: /moved` (`true`), or not.
    pub fn set_redirecting(&self, redirecting: bool) {
        self.redirecting.store(redirecting, Ordering::SeqCst);
    }

    /// Requests that followed a redirect to /moved.
    pub fn redirected_gets(&self) -> usize {
        self.redirected_gets.load(Ordering::SeqCst)
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

    /// How many distinct events (by `webhook-id`) matching `pred` arrived,
    /// acknowledged or not: a repeat of one event counts once.
    pub fn distinct(&self, pred: impl Fn(&Received) -> bool) -> usize {
        self.all()
            .iter()
            .filter(|r| pred(r))
            .map(|r| r.webhook_id.clone())
            .collect::<std::collections::HashSet<_>>()
            .len()
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

impl Drop for Receiver {
    fn drop(&mut self) {
        let undocumented = self.undocumented.lock().unwrap();
        if !undocumented.is_empty() && !std::thread::panicking() {
            panic!(
                "requests that are no valid, documented event:\n{}",
                undocumented.join("\n")
            );
        }
    }
}
