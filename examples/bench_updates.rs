//! Measures, against the real mail stack (scripts/mailstack/start.sh), the time
//! from another client's flag change in the mailbox (UID STORE +FLAGS \Seen,
//! answered by Dovecot) to the webhook receiving `message.updated`.
//!
//!     cargo build --release && cargo run --release --example bench_updates -- [changes]
//!
//! The daemon is the release binary, started as a child process.

use std::{
    collections::HashMap,
    io::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::post};
use futures_util::TryStreamExt as _;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor, address::Envelope};
use mailbridge::{
    imap::ImapConnector,
    model::{Endpoint, Login, Security},
};

/// Arrival times by (event type, message id).
type Arrivals = Arc<Mutex<HashMap<(String, String), Instant>>>;

async fn hook(State(arrivals): State<Arrivals>, body: Bytes) -> StatusCode {
    let now = Instant::now();
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body)
        && let (Some(kind), Some(id)) = (json["type"].as_str(), json["data"]["message_id"].as_str())
    {
        arrivals
            .lock()
            .unwrap()
            .insert((kind.to_string(), id.to_string()), now);
    }
    StatusCode::NO_CONTENT
}

mod bench_support;

use bench_support::{BenchDaemon, stack_env, wait_until};

#[tokio::main]
async fn main() {
    let changes: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50);
    let env = stack_env();
    let domain = env["MAILSTACK_DOMAIN"].clone();
    let imaps: u16 = env["MAILSTACK_IMAPS_PORT"].parse().unwrap();
    let mx: u16 = env["MAILSTACK_SMTP_PORT"].parse().unwrap();

    let arrivals: Arrivals = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(arrivals.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let daemon = BenchDaemon::start(
        &env,
        &format!("[[webhooks]]\nurl = \"{hook_url}\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n"),
    )
    .await;
    let base = daemon.base.clone();
    let http = reqwest::Client::new();

    let run = std::process::id();
    let address = format!("updates{run}@{domain}");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&env["MAILSTACK_USERS_FILE"])
        .unwrap()
        .write_all(format!("{address}:{{PLAIN}}benchpw::::::\n").as_bytes())
        .unwrap();
    let contact = format!("contact{run}@{domain}");
    http.put(format!("{base}/v1/locations/L1/contacts/c1"))
        .bearer_auth("bench")
        .json(&serde_json::json!({"emails": [contact], "assigned_user_ids": ["u1"]}))
        .send()
        .await
        .unwrap();
    let endpoint = serde_json::json!({"host": "127.0.0.1", "port": imaps, "security": "tls"});
    wait_until("the mailbox connected", async || {
        let r = http
            .put(format!("{base}/v1/locations/L1/users/u1/mailbox"))
            .bearer_auth("bench")
            .json(&serde_json::json!({
                "email": address, "provider": "imap",
                "auth": {"type": "password", "password": "benchpw"},
                "imap": endpoint, "smtp": {"host": "127.0.0.1", "port": 10465, "security": "tls"},
            }))
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    wait_until("active", async || {
        let r = http
            .get(format!("{base}/v1/locations/L1/users/u1/mailbox"))
            .bearer_auth("bench")
            .send()
            .await
            .ok()?;
        let body: serde_json::Value = r.json().await.ok()?;
        (body["state"] == "active").then_some(())
    })
    .await;

    // The messages to change, synced first.
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(mx)
        .build();
    let ids: Vec<String> = (0..changes)
        .map(|n| format!("<upd{n}.{run}@bench>"))
        .collect();
    for (n, id) in ids.iter().enumerate() {
        let raw = format!(
            "From: {contact}\r\nTo: {address}\r\nSubject: update {n}\r\nMessage-ID: {id}\r\n\r\nhello\r\n"
        );
        let envelope = Envelope::new(
            Some(contact.parse().unwrap()),
            vec![address.parse().unwrap()],
        )
        .unwrap();
        transport.send_raw(&envelope, raw.as_bytes()).await.unwrap();
    }
    wait_until("every message synced", async || {
        let arrived = arrivals.lock().unwrap();
        ids.iter()
            .all(|id| arrived.contains_key(&("message.inbound".to_string(), id.clone())))
            .then_some(())
    })
    .await;

    // The other client: one session, as a phone or webmail keeps open.
    let tls = mailbridge::tls::client_config(&[env["MAILSTACK_CA_CERT"].clone().into()]).unwrap();
    let mut client = ImapConnector::new(
        tls,
        Duration::from_secs(20),
        mailbridge::egress::Egress {
            allow_private: true,
        },
    )
    .open(
        &Endpoint {
            host: "127.0.0.1".into(),
            port: imaps,
            security: Security::Tls,
        },
        &Login::Password {
            username: address.clone(),
            password: "benchpw".into(),
        },
    )
    .await
    .unwrap();
    client.select("INBOX").await.unwrap();
    let mut latencies = Vec::new();
    for id in &ids {
        let uid = client
            .uid_search(format!("HEADER Message-ID \"{id}\""))
            .await
            .unwrap()
            .into_iter()
            .next()
            .unwrap();
        let _: Vec<_> = client
            .uid_store(uid.to_string(), "+FLAGS.SILENT (\\Seen)")
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let changed = Instant::now();
        let arrived = wait_until("message.updated", async || {
            arrivals
                .lock()
                .unwrap()
                .get(&("message.updated".to_string(), id.clone()))
                .copied()
        })
        .await;
        latencies.push(arrived.duration_since(changed));
        // Spaced like a person reading, not a burst: Dovecot batches notifications.
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let at = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    println!("| measurement | value |");
    println!("|---|---|");
    println!(
        "| flag change in the mailbox → message.updated received, {changes} changes | median {:.0} ms, p99 {:.0} ms, min {:.0} ms, max {:.0} ms |",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(latencies[0]),
        ms(latencies[latencies.len() - 1])
    );
    let _ = client.logout().await;
    daemon.stop().await;
}
