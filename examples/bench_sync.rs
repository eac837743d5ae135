//! Measures, against the real mail stack (scripts/mailstack/start.sh), the time
//! from the MX accepting a message to the webhook receiving it, and the
//! daemon's resident memory with 1 and with N connected mailboxes.
//!
//!     cargo build --release && cargo run --release --example bench_sync -- [messages] [mailboxes]
//!
//! It starts the release binary as a child process, so the memory is the
//! daemon's alone.

use std::{
    collections::HashMap,
    io::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::post};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor, address::Envelope};

type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

async fn hook(State(arrivals): State<Arrivals>, body: Bytes) -> StatusCode {
    let now = Instant::now();
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body)
        && let Some(subject) = json["data"]["subject"].as_str()
    {
        arrivals.lock().unwrap().insert(subject.to_string(), now);
    }
    StatusCode::NO_CONTENT
}

mod bench_support;

use bench_support::{BenchDaemon, count_active, memory_mib, stack_env, wait_until};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let messages: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(25);
    let mailboxes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let env = stack_env();
    let users_file = env["MAILSTACK_USERS_FILE"].clone();
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

    let mut daemon = BenchDaemon::start(&env, &format!("[[webhooks]]\nurl = \"{hook_url}\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n")).await;
    let (base, pid) = (daemon.base.clone(), daemon.pid);
    let http = reqwest::Client::new();
    let api = |method: reqwest::Method, path: String, body: serde_json::Value| {
        http.request(method, format!("{base}{path}"))
            .bearer_auth("bench")
            .json(&body)
            .send()
    };

    let run = std::process::id();
    let new_user = |n: usize| {
        let address = format!("bench{run}x{n}@{domain}");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&users_file)
            .unwrap();
        file.write_all(format!("{address}:{{PLAIN}}benchpw::::::\n").as_bytes())
            .unwrap();
        address
    };
    let contact = format!("contact{run}@{domain}");
    api(
        reqwest::Method::PUT,
        "/v1/locations/L1/contacts/c1".into(),
        serde_json::json!({"emails": [contact], "assigned_user_ids": ["u1"]}),
    )
    .await
    .unwrap();
    let addresses: Vec<String> = (0..mailboxes).map(new_user).collect();
    let connect = async |i: usize, address: &str| {
        let body = serde_json::json!({
            "email": address, "provider": "imap",
            "auth": {"type": "password", "password": "benchpw"},
            "imap": {"host": "127.0.0.1", "port": imaps, "security": "tls"},
            "smtp": {"host": "127.0.0.1", "port": 10465, "security": "tls"},
        });
        // Dovecot notices new users within about a second.
        wait_until("the user to exist", async || {
            let r = api(
                reqwest::Method::PUT,
                format!("/v1/locations/L1/users/u{}/mailbox", i + 1),
                body.clone(),
            )
            .await
            .ok()?;
            r.status().is_success().then_some(())
        })
        .await;
    };
    let wait_active = async |i: usize| {
        wait_until("active", async || {
            let r = http
                .get(format!("{base}/v1/locations/L1/users/u{}/mailbox", i + 1))
                .bearer_auth("bench")
                .send()
                .await
                .ok()?;
            let body: serde_json::Value = r.json().await.ok()?;
            (body["state"] == "active").then_some(())
        })
        .await;
    };
    connect(0, &addresses[0]).await;
    wait_active(0).await;
    // Let both IDLE sessions settle before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_one = memory_mib(pid).0;

    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(mx)
        .build();
    let mut latencies = Vec::new();
    for n in 0..messages {
        let subject = format!("latency {n}");
        let raw = format!(
            "From: {contact}\r\nTo: {}\r\nSubject: {subject}\r\nMessage-ID: <lat{n}.{run}@bench>\r\n\r\nhello\r\n",
            addresses[0]
        );
        let envelope = Envelope::new(
            Some(contact.parse().unwrap()),
            vec![addresses[0].parse().unwrap()],
        )
        .unwrap();
        transport.send_raw(&envelope, raw.as_bytes()).await.unwrap();
        let accepted = Instant::now();
        let arrived = wait_until("the webhook", async || {
            arrivals.lock().unwrap().get(&subject).copied()
        })
        .await;
        latencies.push(arrived.duration_since(accepted));
        // Spaced like real mail, not a burst: Dovecot batches notifications.
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = latencies[latencies.len() / 2];
    let max = latencies[latencies.len() - 1];
    let min = latencies[0];

    let started = Instant::now();
    for (i, address) in addresses.iter().enumerate().skip(1) {
        connect(i, address).await;
    }
    for i in 1..mailboxes {
        wait_active(i).await;
    }
    let connect_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_many = memory_mib(pid).0;

    // Restart → all active, by the operators' listing: a mailbox counts only
    // once every one of its folders' sessions has logged in and caught up.
    daemon.restart().await;
    let restarted = Instant::now();
    let base = daemon.base.clone();
    let active_after_restart = async || count_active(&http, &base).await;
    let first_answer = active_after_restart().await.unwrap_or(0);
    wait_until("every mailbox active after the restart", async || {
        (active_after_restart().await? >= mailboxes).then_some(())
    })
    .await;
    let restart_time = restarted.elapsed();

    println!("| measurement | value |");
    println!("|---|---|");
    println!(
        "| MX accept → webhook received, {messages} messages one at a time | median {:.0} ms, min {:.0} ms, max {:.0} ms |",
        ms(median),
        ms(min),
        ms(max)
    );
    println!(
        "| daemon RSS, 1 mailbox connected (2 IDLE sessions) | {:.1} MiB |",
        rss_one
    );
    println!(
        "| daemon RSS, {mailboxes} mailboxes connected ({} IDLE sessions) | {:.1} MiB |",
        mailboxes * 2,
        rss_many
    );
    println!(
        "| connecting {} more mailboxes through the API, until all active | {:.1} s |",
        mailboxes - 1,
        connect_time.as_secs_f64()
    );
    println!(
        "| restart (SIGTERM, start again) → all {mailboxes} mailboxes active | {:.1} s (active at the first answer after the restart: {first_answer}) |",
        restart_time.as_secs_f64()
    );
    daemon.stop().await;
}
