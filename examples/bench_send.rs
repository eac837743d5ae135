//! Measures CRM sends against the real mail stack (scripts/mailstack/start.sh):
//! the time from the API's 202 to the SMTP server's acceptance, per send, and
//! the throughput of one mailbox when many sends are queued at once.
//!
//!     cargo build --release && cargo run --release --example bench_send -- [sends]

use std::{
    io::Write as _,
    time::{Duration, Instant},
};

mod bench_support;

use bench_support::{BenchDaemon, memory_mib, stack_env, wait_until};

#[tokio::main]
async fn main() {
    let sends: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(60);
    let env = stack_env();
    let domain = env["MAILSTACK_DOMAIN"].clone();
    let daemon = BenchDaemon::start(&env, "").await;
    let (base, pid) = (daemon.base.clone(), daemon.pid);
    let http = reqwest::Client::new();

    let run = std::process::id();
    let me = format!("sender{run}@{domain}");
    let contact = format!("rcpt{run}@{domain}");
    let mut users = std::fs::OpenOptions::new()
        .append(true)
        .open(&env["MAILSTACK_USERS_FILE"])
        .unwrap();
    users
        .write_all(
            format!("{me}:{{PLAIN}}benchpw::::::\n{contact}:{{PLAIN}}benchpw::::::\n").as_bytes(),
        )
        .unwrap();
    http.put(format!("{base}/v1/locations/L1/contacts/c1"))
        .bearer_auth("bench")
        .json(&serde_json::json!({"emails": [contact], "assigned_user_ids": ["u1"]}))
        .send()
        .await
        .unwrap();
    let connect = serde_json::json!({
        "email": me, "provider": "imap",
        "auth": {"type": "password", "password": "benchpw"},
        "imap": {"host": "127.0.0.1", "port": env["MAILSTACK_IMAPS_PORT"].parse::<u16>().unwrap(), "security": "tls"},
        "smtp": {"host": "127.0.0.1", "port": env["MAILSTACK_SUBMISSIONS_PORT"].parse::<u16>().unwrap(), "security": "tls"},
    });
    wait_until("the mailbox to connect", async || {
        let r = http
            .put(format!("{base}/v1/locations/L1/users/u1/mailbox"))
            .bearer_auth("bench")
            .json(&connect)
            .send()
            .await
            .ok()?;
        r.status().is_success().then_some(())
    })
    .await;

    let status_of = async |id: &str| -> serde_json::Value {
        http.get(format!("{base}/v1/messages/{id}"))
            .bearer_auth("bench")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    };
    let post_send = async |body: serde_json::Value| -> String {
        let r: serde_json::Value = http
            .post(format!("{base}/v1/locations/L1/users/u1/messages"))
            .bearer_auth("bench")
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        r["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no 202: {r}"))
            .to_string()
    };
    let send = async |n: usize| -> String {
        post_send(serde_json::json!({"contact_id": "c1", "subject": format!("bench {n}"), "text": "hello", "html": "<p>hello</p>"})).await
    };
    let sent_at = |s: &serde_json::Value| -> Option<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> {
        let created = s["created_at"].as_str()?.parse().ok()?;
        let sent = s["sent_at"].as_str()?.parse().ok()?;
        Some((created, sent))
    };

    // 1. One at a time: API accept → SMTP accepted.
    let mut latencies = Vec::new();
    for n in 0..sends {
        let id = send(n).await;
        let (created, sent) = wait_until("the send", async || sent_at(&status_of(&id).await)).await;
        latencies.push((sent - created).to_std().unwrap_or_default());
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;

    // 2. Burst: queue them all, then see how fast one mailbox drains them.
    let started = Instant::now();
    let mut ids = Vec::new();
    for n in 0..sends {
        ids.push(send(sends + n).await);
    }
    let accepted_all = started.elapsed();
    let last = ids.last().unwrap().clone();
    wait_until("the burst", async || sent_at(&status_of(&last).await)).await;
    let drained = started.elapsed();

    // 3. One send with 25 MB of attachments: how much memory it takes.
    let (_, peak_before) = memory_mib(pid);
    let big = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(vec![0x5au8; 25 * 1024 * 1024])
    };
    let body = serde_json::json!({"contact_id": "c1", "subject": "big", "text": "see attached",
        "attachments": [{"filename": "big.bin", "content_base64": big}]});
    drop(big);
    let big_id = post_send(body).await;
    wait_until("the 25 MB send", async || {
        sent_at(&status_of(&big_id).await)
    })
    .await;
    let (after, peak_after) = memory_mib(pid);

    println!("| measurement | value |");
    println!("|---|---|");
    println!(
        "| API accept → SMTP accepted, {sends} sends one at a time | median {:.1} ms, p99 {:.1} ms, max {:.1} ms |",
        ms(pct(0.5)),
        ms(pct(0.99)),
        ms(*latencies.last().unwrap())
    );
    println!(
        "| {sends} sends queued at once through one mailbox | all accepted (202) in {:.2} s; all submitted after {:.2} s → {:.1} sends/s |",
        accepted_all.as_secs_f64(),
        drained.as_secs_f64(),
        sends as f64 / drained.as_secs_f64()
    );
    println!(
        "| one send with 25 MB of attachments (35 MB of JSON) | peak RSS {peak_before:.0} → {peak_after:.0} MiB; {after:.0} MiB after it was sent |"
    );
    daemon.stop().await;
}
