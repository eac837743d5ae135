//! The scale run (issue 11): one daemon, N mailboxes on the real mail stack,
//! every figure of the table taken in one run, and a check that
//! nothing was lost or doubled on the way.
//!
//!     scripts/bench-scale.sh N                       (sizes the stack for N, runs this)
//!     cargo run --release --example bench_scale -- N [--smoke]
//!
//! Figures: resident memory with no mailbox and with N (the marginal cost per
//! mailbox); 8 parallel connect calls until all N are `active` by the
//! operators' listing; MX → webhook latency next to a bare IDLE client on the
//! same mailbox, with one mailbox and with N; one message to 100 mailboxes
//! next to 100 bare IDLE clients (Dovecot's own push floor); restart → all
//! active. `--smoke` (CI, 100 mailboxes) takes fewer samples: only its checks
//! count there, never its speed.
//!
//! Mailboxes are the stack's load users (`MAILSTACK_LOAD_USERS=N`) when it has
//! them, or users appended to its users file.

use std::{
    collections::HashMap,
    io::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_imap::{
    extensions::idle::IdleResponse,
    imap_proto::{MailboxDatum, Response},
};
use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::post};
use futures_util::StreamExt as _;
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor, address::Envelope};
use mailbridge::{
    egress::Egress,
    imap::ImapConnector,
    model::{Endpoint, Login, Security},
};

mod bench_support;

use bench_support::{
    BenchDaemon, connections_to, count_active, cpu_seconds, machine_busy_seconds, memory_mib,
    server_connections, stack_env, wait_until, wait_until_every,
};

/// Every `message.*` webhook with a subject: who it was for, and when it came.
#[derive(Default)]
struct Received {
    arrivals: Mutex<Vec<(String, String, Instant)>>,
}

impl Received {
    fn at(&self, user_id: &str, subject: &str) -> Option<Instant> {
        let arrivals = self.arrivals.lock().unwrap();
        arrivals
            .iter()
            .find(|(user, s, _)| user == user_id && s == subject)
            .map(|(_, _, at)| *at)
    }

    /// (user, subject) pairs that arrived more than once.
    fn doubled(&self) -> Vec<(String, String)> {
        let mut seen: HashMap<(String, String), usize> = HashMap::new();
        for (user, subject, _) in self.arrivals.lock().unwrap().iter() {
            *seen.entry((user.clone(), subject.clone())).or_default() += 1;
        }
        seen.into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(k, _)| k)
            .collect()
    }
}

async fn hook(State(received): State<Arc<Received>>, body: Bytes) -> StatusCode {
    let now = Instant::now();
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body)
        && let Some(subject) = json["data"]["subject"].as_str()
        && let Some(user) = json["data"]["user_id"].as_str()
    {
        received
            .arrivals
            .lock()
            .unwrap()
            .push((user.to_string(), subject.to_string(), now));
    }
    StatusCode::NO_CONTENT
}

/// A plain IDLE client on one mailbox's INBOX, outside the daemon: when it
/// hears of new mail is when the server pushed it.
struct BareIdle {
    notices: Arc<Mutex<Vec<Instant>>>,
    ready: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl BareIdle {
    fn start(connector: ImapConnector, endpoint: Endpoint, login: Login) -> BareIdle {
        let notices: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let ready = Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn({
            let (notices, ready) = (notices.clone(), ready.clone());
            async move {
                let mut session = connector
                    .open(&endpoint, &login)
                    .await
                    .expect("bare client login");
                session.select("INBOX").await.expect("bare client SELECT");
                loop {
                    let mut idle = session.idle();
                    idle.init().await.expect("bare client IDLE");
                    ready.notify_one();
                    let (wait, _stop) = idle.wait_with_timeout(Duration::from_secs(20 * 60));
                    if let Ok(IdleResponse::NewData(data)) = wait.await
                        && let Response::MailboxData(MailboxDatum::Exists(_)) = data.parsed()
                    {
                        notices.lock().unwrap().push(Instant::now());
                    }
                    // Dovecot may drop a client under load (a failed
                    // unhibernate, seen at 10,000): its figures are taken.
                    session = match idle.done().await {
                        Ok(session) => session,
                        Err(err) => {
                            eprintln!("a bare IDLE client ended: {err}");
                            return;
                        }
                    };
                }
            }
        });
        BareIdle {
            notices,
            ready,
            task,
        }
    }

    async fn first_notice_after(&self, after: Instant) -> Instant {
        wait_until("the bare IDLE client's notice", async || {
            self.notices
                .lock()
                .unwrap()
                .iter()
                .find(|at| **at >= after)
                .copied()
        })
        .await
    }
}

impl Drop for BareIdle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The p-th percentile (0..=100) of sorted samples, nearest rank.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = args.iter().any(|a| a == "--smoke");
    let mailboxes: usize = args
        .iter()
        .find_map(|a| a.parse().ok())
        .unwrap_or(100)
        .max(1);
    let samples = if smoke { 5 } else { 40 };
    let fan_out = mailboxes.min(100);

    let env = stack_env();
    let domain = env["MAILSTACK_DOMAIN"].clone();
    let imaps: u16 = env["MAILSTACK_IMAPS_PORT"].parse().unwrap();
    let submissions: u16 = env["MAILSTACK_SUBMISSIONS_PORT"].parse().unwrap();
    let mx: u16 = env["MAILSTACK_SMTP_PORT"].parse().unwrap();
    let users_file = env["MAILSTACK_USERS_FILE"].clone();
    let run = std::process::id();

    let users = std::fs::read_to_string(&users_file).unwrap();
    let (addresses, password): (Vec<String>, &str) =
        if users.contains(&format!("\nload{}@{domain}:", mailboxes - 1)) {
            let addresses = (0..mailboxes).map(|i| format!("load{i}@{domain}"));
            (addresses.collect(), "loadpw")
        } else {
            let addresses: Vec<String> = (0..mailboxes)
                .map(|i| format!("scale{run}x{i}@{domain}"))
                .collect();
            let lines: String = addresses
                .iter()
                .map(|a| format!("{a}:{{PLAIN}}scalepw::::::\n"))
                .collect();
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&users_file)
                .unwrap();
            file.write_all(lines.as_bytes()).unwrap();
            (addresses, "scalepw")
        };

    let received = Arc::new(Received::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(received.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut daemon = BenchDaemon::start(
        &env,
        &format!(
            "[[webhooks]]\nurl = \"{hook_url}\"\nsecret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n"
        ),
    )
    .await;
    // Nothing connected yet: what the daemon costs on its own.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_base = memory_mib(daemon.pid).0;

    let http = reqwest::Client::new();
    let contact = format!("contact{run}@{domain}");
    let assigned: Vec<String> = (1..=fan_out).map(|i| format!("u{i}")).collect();
    let response = http
        .put(format!("{}/v1/locations/L1/contacts/c1", daemon.base))
        .bearer_auth("bench")
        .json(&serde_json::json!({"emails": [contact], "assigned_user_ids": assigned}))
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "contact: {}",
        response.status()
    );

    let connect = async |base: &str, i: usize| {
        let body = serde_json::json!({
            "email": addresses[i], "provider": "imap",
            "auth": {"type": "password", "password": password},
            "imap": {"host": "127.0.0.1", "port": imaps, "security": "tls"},
            "smtp": {"host": "127.0.0.1", "port": submissions, "security": "tls"},
        });
        // A user just appended to the users file exists within about a second.
        wait_until("the connect call", async || {
            let response = http
                .put(format!("{base}/v1/locations/L1/users/u{}/mailbox", i + 1))
                .bearer_auth("bench")
                .json(&body)
                .send()
                .await
                .ok()?;
            response.status().is_success().then_some(())
        })
        .await;
    };
    let count_active = async |base: &str| count_active(&http, base).await;
    // Every 250 ms: listing 10,000 mailboxes every 20 ms took a good part
    // of a core from the connects and restarts being measured.
    let all_active = async |base: &str, n: usize| {
        wait_until_every(
            "every mailbox active",
            Duration::from_millis(250),
            async || (count_active(base).await? >= n).then_some(()),
        )
        .await;
    };

    let tls = mailbridge::tls::client_config(&[env["MAILSTACK_CA_CERT"].clone().into()])
        .expect("TLS config");
    let connector = ImapConnector::new(
        tls,
        Duration::from_secs(30),
        Egress {
            allow_private: true,
        },
    );
    let endpoint = Endpoint {
        host: "127.0.0.1".into(),
        port: imaps,
        security: Security::Tls,
    };
    let bare = |i: usize| {
        BareIdle::start(
            connector.clone(),
            endpoint.clone(),
            Login::Password {
                username: addresses[i].clone(),
                password: password.to_string(),
            },
        )
    };
    let mx_transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(mx)
        .build();
    let deliver = async |to: &[String], subject: &str| -> Instant {
        let raw = format!(
            "From: {contact}\r\nTo: {}\r\nSubject: {subject}\r\nMessage-ID: <{}.{run}@bench>\r\n\r\nhello\r\n",
            to[0],
            subject.replace(' ', "-"),
        );
        let envelope = Envelope::new(
            Some(contact.parse().unwrap()),
            to.iter().map(|a| a.parse().unwrap()).collect(),
        )
        .unwrap();
        mx_transport
            .send_raw(&envelope, raw.as_bytes())
            .await
            .unwrap();
        Instant::now()
    };
    // MX accept → webhook, and how much later than a bare IDLE client on the
    // same mailbox heard of it (the bridge's own share).
    let latency = async |base_tag: &str, watcher: &BareIdle| -> (Vec<f64>, Vec<f64>) {
        let (mut total, mut added) = (Vec::new(), Vec::new());
        for n in 0..samples {
            let subject = format!("{base_tag} {n}");
            let accepted = deliver(std::slice::from_ref(&addresses[0]), &subject).await;
            let arrived = wait_until("the webhook", async || received.at("u1", &subject)).await;
            let noticed = watcher.first_notice_after(accepted).await;
            total.push(ms(arrived - accepted));
            added.push(
                arrived.duration_since(noticed).as_secs_f64() * 1000.0
                    - noticed.duration_since(arrived).as_secs_f64() * 1000.0,
            );
            // Spaced like real mail, not a burst: Dovecot batches notifications.
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        total.sort_by(f64::total_cmp);
        added.sort_by(f64::total_cmp);
        (total, added)
    };

    // Dovecot's own connect floor, before the daemon holds any session: the
    // same N logins by bare clients, as many at once as the daemon's default
    // `max_concurrent_logins` (64), each TLS, LOGIN, SELECT INBOX and IDLE.
    let floor_busy = machine_busy_seconds();
    let floor_started = Instant::now();
    let floor_sessions: Vec<_> = futures_util::stream::iter(0..mailboxes)
        .map(|i| {
            let (connector, endpoint) = (connector.clone(), endpoint.clone());
            let login = Login::Password {
                username: addresses[i].clone(),
                password: password.to_string(),
            };
            async move {
                let mut session = connector.open(&endpoint, &login).await.ok()?;
                session.select("INBOX").await.ok()?;
                let mut idle = session.idle();
                idle.init().await.ok()?;
                Some(idle)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let floor_connect = floor_started.elapsed();
    let floor_connect_busy = machine_busy_seconds() - floor_busy;
    let floor_failed = floor_sessions.iter().filter(|s| s.is_none()).count();
    drop(floor_sessions);
    wait_until("Dovecot to let go of the bare sessions", async || {
        (server_connections(imaps) == 0).then_some(())
    })
    .await;

    // One mailbox alone.
    connect(&daemon.base, 0).await;
    all_active(&daemon.base, 1).await;
    let watcher = bare(0);
    watcher.ready.notified().await;
    let (alone_total, alone_added) = latency("alone", &watcher).await;

    // The rest, by 8 parallel connect calls, until the listing shows all active.
    let (connect_busy, connect_daemon_cpu) = (machine_busy_seconds(), cpu_seconds(daemon.pid));
    let started = Instant::now();
    futures_util::stream::iter(1..mailboxes)
        .for_each_concurrent(8, |i| connect(&daemon.base, i))
        .await;
    let calls_done = started.elapsed();
    all_active(&daemon.base, mailboxes).await;
    let connect_time = started.elapsed();
    let connect_busy = machine_busy_seconds() - connect_busy;
    let connect_daemon_cpu = cpu_seconds(daemon.pid) - connect_daemon_cpu;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_all = memory_mib(daemon.pid).0;
    let sessions = connections_to(daemon.pid, imaps);

    let (all_total, all_added) = latency("loaded", &watcher).await;

    // One message to 100 mailboxes, next to a bare client on each.
    let floor_watchers: Vec<BareIdle> = (0..fan_out).map(bare).collect();
    for w in &floor_watchers {
        w.ready.notified().await;
    }
    let accepted = deliver(&addresses[..fan_out], "fan-out").await;
    let mut fan_out_times = Vec::new();
    for i in 0..fan_out {
        let user = format!("u{}", i + 1);
        let arrived = wait_until("a fan-out webhook", async || received.at(&user, "fan-out")).await;
        fan_out_times.push(ms(arrived - accepted));
    }
    let mut floor = Vec::new();
    for w in &floor_watchers {
        floor.push(ms(w.first_notice_after(accepted).await - accepted));
    }
    drop(floor_watchers);
    fan_out_times.sort_by(f64::total_cmp);
    floor.sort_by(f64::total_cmp);

    // Restart → all active again.
    let restart_busy = machine_busy_seconds();
    daemon.restart().await;
    let restarted = Instant::now();
    let active_at_first_answer = count_active(&daemon.base).await.unwrap_or(0);
    all_active(&daemon.base, mailboxes).await;
    let restart_time = restarted.elapsed();
    let restart_busy = machine_busy_seconds() - restart_busy;
    // The new process's whole life so far: its start and every login.
    let restart_daemon_cpu = cpu_seconds(daemon.pid);
    // Nothing doubled by the restart: a last message, then every count.
    deliver(std::slice::from_ref(&addresses[0]), "after restart").await;
    wait_until("the webhook after the restart", async || {
        received.at("u1", "after restart")
    })
    .await;
    drop(watcher);
    let doubled = received.doubled();
    assert!(doubled.is_empty(), "delivered more than once: {doubled:?}");
    let expected = 2 * samples + fan_out + 1;
    let delivered = received.arrivals.lock().unwrap().len();
    assert_eq!(delivered, expected, "webhooks received vs messages sent");
    daemon.stop().await;

    println!(
        "scale run: {mailboxes} mailboxes ({sessions} IMAP sessions), {} samples per latency figure{}",
        samples,
        if smoke { ", smoke" } else { "" }
    );
    println!("every message delivered once: {delivered} webhooks, none doubled");
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| 8 parallel connect calls → all {mailboxes} active | {:.1} s (calls answered after {:.1} s) |",
        connect_time.as_secs_f64(),
        calls_done.as_secs_f64()
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!(
        "| the same {mailboxes} logins by bare clients, 64 at once (TLS, LOGIN, SELECT, IDLE): Dovecot's floor | {:.1} s ({floor_failed} failed) |",
        floor_connect.as_secs_f64()
    );
    for (label, wall, busy, daemon_cpu) in [
        (
            "connect",
            connect_time,
            connect_busy,
            Some(connect_daemon_cpu),
        ),
        ("bare logins", floor_connect, floor_connect_busy, None),
        (
            "restart",
            restart_time,
            restart_busy,
            Some(restart_daemon_cpu),
        ),
    ] {
        println!(
            "| CPU during {label}: the daemon / the whole machine / available | {} / {busy:.1} s / {:.1} s |",
            daemon_cpu.map_or("-".to_string(), |cpu| format!("{cpu:.1} s")),
            wall.as_secs_f64() * cores
        );
    }
    println!(
        "| RSS: no mailbox / {mailboxes} mailboxes / per mailbox | {rss_base:.1} MiB / {rss_all:.1} MiB / {:.1} KiB |",
        (rss_all - rss_base) * 1024.0 / mailboxes as f64
    );
    for (label, total, added) in [
        ("1 mailbox connected", &alone_total, &alone_added),
        (
            &*format!("{mailboxes} mailboxes connected"),
            &all_total,
            &all_added,
        ),
    ] {
        println!(
            "| MX → webhook, {label} | p50 {:.0} ms, p99 {:.0} ms |",
            percentile(total, 50.0),
            percentile(total, 99.0)
        );
        println!(
            "| added over a bare IDLE client, {label} | p50 {:+.1} ms, p99 {:+.1} ms |",
            percentile(added, 50.0),
            percentile(added, 99.0)
        );
    }
    println!(
        "| one message to {fan_out} mailboxes → webhooks | median {:.0} ms, last {:.0} ms |",
        percentile(&fan_out_times, 50.0),
        percentile(&fan_out_times, 100.0)
    );
    println!(
        "| the same, {fan_out} bare IDLE clients (Dovecot's floor) | median {:.0} ms, last {:.0} ms |",
        percentile(&floor, 50.0),
        percentile(&floor, 100.0)
    );
    println!(
        "| restart → all {mailboxes} active | {:.1} s (active at the first answer: {active_at_first_answer}) |",
        restart_time.as_secs_f64()
    );
}
