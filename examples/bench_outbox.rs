//! How fast a backlog drains once the CRM is back: N events waiting in the
//! outbox (spread over threads, several per thread), a receiver that answers
//! each POST after 1 ms, and the real deliverer with its default settings.
//! Fails unless every event arrived once and each thread's in order.
//!
//!     cargo run --release --example bench_outbox -- [events] [per_thread]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::post};
use mailbridge::{
    config::{DeliveryConfig, WebhookConfig},
    model::Event,
    store::{SledStore, Store, secret_box::SecretBox},
    webhook::{Deliverer, OutboxSignal},
};
use tokio_util::sync::CancellationToken;

type Arrivals = Arc<Mutex<Vec<(String, String)>>>;

async fn hook(State(arrivals): State<Arrivals>, body: Bytes) -> StatusCode {
    tokio::time::sleep(Duration::from_millis(1)).await;
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) {
        let thread = json["data"]["thread_id"].as_str().unwrap_or("").to_string();
        let id = json["data"]["n"].to_string();
        arrivals.lock().unwrap().push((thread, id));
    }
    StatusCode::NO_CONTENT
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let events: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let per_thread: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);

    let arrivals: Arrivals = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(arrivals.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SledStore::open(dir.path(), SecretBox::from_key(&[9; 32])).unwrap());
    let threads = events.div_ceil(per_thread);
    let started = Instant::now();
    let backlog: Vec<Event> = (0..events)
        .map(|n| {
            let thread = format!("thr_{:06}", n % threads);
            Event {
                id: format!("evt_{n:08}"),
                kind: "message.inbound".into(),
                timestamp: chrono::Utc::now(),
                ordering_key: thread.clone(),
                data: serde_json::json!({"thread_id": thread, "n": n, "subject": "Quarterly figures", "text": "The figures are attached."}),
            }
        })
        .collect();
    for chunk in backlog.chunks(1_000) {
        store.enqueue(chunk).unwrap();
    }
    println!(
        "{events} events over {threads} threads queued in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    let deliverer = Deliverer::new(
        store.clone(),
        &[WebhookConfig {
            url,
            secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into(),
        }],
        reqwest::Client::new(),
        DeliveryConfig::default(),
        OutboxSignal::default(),
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let running = tokio::spawn(deliverer.run(shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(600);
    while arrivals.lock().unwrap().len() < events && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drained = started.elapsed();
    shutdown.cancel();
    let _ = running.await;

    let arrivals = arrivals.lock().unwrap();
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut out_of_order = 0;
    for (thread, n) in arrivals.iter() {
        let n: i64 = n.parse().unwrap_or(-1);
        if last.get(thread.as_str()).is_some_and(|&before| before > n) {
            out_of_order += 1;
        }
        last.insert(thread, n);
    }
    let distinct: std::collections::HashSet<_> = arrivals.iter().map(|(_, n)| n).collect();
    println!(
        "drained {} of {events} events ({} distinct) in {:.2} s: {:.0} events/s; {out_of_order} out of thread order; {} left in the outbox",
        arrivals.len(),
        distinct.len(),
        drained.as_secs_f64(),
        arrivals.len() as f64 / drained.as_secs_f64(),
        store.outbox_len().unwrap(),
    );
    // A figure for a drain that lost, doubled or reordered events is no
    // figure: the run fails instead.
    assert_eq!(arrivals.len(), events, "every event arrives once");
    assert_eq!(distinct.len(), events, "no event arrives twice");
    assert_eq!(out_of_order, 0, "each thread's events in order");
}
