//! The store on sled and on PostgreSQL side by side, in one run on one
//! machine (issue 22 item 8): ingest of the 21 KB multipart message through
//! `Ingest::handle` and through catch-up batches, with 1, 4 and 16 mailboxes
//! writing at once; the outbox drain of 10,000 events to a real HTTP
//! receiver; and `Store::accept_send` one send at a time, as the API's send
//! path calls it. Each measurement runs on sled and then on PostgreSQL, so
//! what else the machine is doing weighs on both alike.
//!
//! Every figure is checked before it is printed (each message queued and its
//! events in the outbox, each event delivered once and in thread order, each
//! send accepted once and a repeat of its key answered as a repeat): an
//! engine that loses or doubles work makes the run fail, not a fast number.
//!
//!     cargo run --release --example bench_engines -- [--postgres URL] [--messages N]
//!         [--events N] [--sends N] [--pool N]
//!
//! The PostgreSQL URL defaults to the test database scripts/postgres/start.sh
//! runs (its postgres.env). The run works in a schema of its own,
//! `bench_<random>`, dropped at the end.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, body::Bytes, extract::State, http::StatusCode, routing::post};
use chrono::Utc;
use mailbridge::{
    config::{DeliveryConfig, WebhookConfig},
    ingest::{Found, Ingest, Outcome},
    model::{
        Contact, Credentials, Direction, Endpoint, Event, FolderCursor, FolderRole, Integration,
        Mailbox, MailboxState, MessageEventData, Origin, Provider, Security, SendRecord,
        SendStatus, Thread, ThreadRoute,
    },
    smart_address::SmartAddresses,
    store::{
        ContactUpsert, NewSend, SendAcceptance, SledStore, Store,
        engine::postgres::{PostgresEngine, PostgresOptions},
        kv_store::KvStore,
        secret_box::SecretBox,
    },
    webhook::{Deliverer, OutboxSignal},
};
use tokio_util::sync::CancellationToken;

const CONTACT: &str = "ann@customer.test";
const UID_VALIDITY: u32 = 7;

struct Options {
    postgres: String,
    /// Messages per ingest measurement (all writers together).
    messages: usize,
    events: usize,
    sends: usize,
    /// PostgreSQL connections (the daemon's default, storage.postgres.pool_size).
    pool: usize,
}

fn options() -> Options {
    let mut options = Options {
        postgres: String::new(),
        messages: 3_200,
        events: 10_000,
        sends: 1_000,
        pool: 8,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| panic!("{flag} needs a value"))
        };
        let number = |text: String| -> usize {
            text.parse()
                .unwrap_or_else(|_| panic!("{flag}: {text:?} is not a number"))
        };
        match flag.as_str() {
            "--postgres" => options.postgres = value(),
            "--messages" => options.messages = number(value()),
            "--events" => options.events = number(value()),
            "--sends" => options.sends = number(value()),
            "--pool" => options.pool = number(value()),
            other => panic!("unknown option {other}; see the example's first lines"),
        }
    }
    if options.postgres.is_empty() {
        let file = "/tmp/mailbridge-postgres/postgres.env";
        options.postgres = std::env::var("TEST_POSTGRES_URL")
            .ok()
            .or_else(|| {
                let env = std::fs::read_to_string(file).ok()?;
                env.lines()
                    .find_map(|line| line.strip_prefix("TEST_POSTGRES_URL="))
                    .map(str::to_string)
            })
            .unwrap_or_else(|| {
                panic!("no --postgres URL and no {file}: run scripts/postgres/start.sh")
            });
    }
    options
}

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Sled,
    Postgres,
}

/// A schema of the run's own on the server, dropped with everything in it.
struct Schema {
    url: String,
    name: String,
}

impl Drop for Schema {
    fn drop(&mut self) {
        let dropped = postgres::Client::connect(&self.url, postgres::NoTls).and_then(|mut c| {
            c.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name))
        });
        if let Err(err) = dropped {
            eprintln!("could not drop schema {}: {err}", self.name);
        }
    }
}

/// A new, empty store on one engine. Fields drop in order: the store (and
/// its connections) before the folder and the schema.
struct Opened {
    store: Arc<dyn Store>,
    /// PostgreSQL only: round trips made so far.
    round_trips: Option<Arc<KvStore<PostgresEngine>>>,
    _dir: tempfile::TempDir,
    _schema: Option<Schema>,
}

impl Opened {
    fn round_trips(&self) -> Option<u64> {
        self.round_trips
            .as_ref()
            .map(|store| store.engine().round_trips())
    }
}

fn open(backend: Backend, options: &Options) -> Opened {
    let dir = tempfile::tempdir().expect("a scratch folder");
    let secrets = SecretBox::from_key(&[7; 32]);
    match backend {
        Backend::Sled => Opened {
            store: Arc::new(SledStore::open(dir.path(), secrets).expect("the sled store")),
            round_trips: None,
            _dir: dir,
            _schema: None,
        },
        Backend::Postgres => {
            let schema = Schema {
                url: options.postgres.clone(),
                name: format!("bench_{}", uuid::Uuid::new_v4().simple()),
            };
            let engine = PostgresEngine::open(PostgresOptions {
                url: options.postgres.clone(),
                pool_size: options.pool,
                schema: schema.name.clone(),
                tls: mailbridge::tls::client_config(&[]).expect("TLS roots"),
            })
            .expect("the PostgreSQL engine");
            let store = Arc::new(
                KvStore::with_engine(engine, dir.path(), secrets).expect("the store on PostgreSQL"),
            );
            Opened {
                store: store.clone(),
                round_trips: Some(store),
                _dir: dir,
                _schema: Some(schema),
            }
        }
    }
}

/// Lines of text as mail clients wrap them.
fn paragraph(words: usize) -> String {
    let line = "The figures for the quarter are attached, with the notes from Monday.\r\n";
    line.repeat(words / 12 + 1)
}

/// The 21 KB message of benches/ingest.rs: multipart/mixed with
/// multipart/alternative (text + HTML) and a small attachment, from the
/// contact to `{to}`; `{id}` is made unique per message.
fn message_template() -> String {
    use base64::Engine as _;
    let text = paragraph(700);
    let html = format!("<html><body><p>{}</p></body></html>", paragraph(700));
    let attachment: Vec<u8> = (0..9_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let encoded = base64::engine::general_purpose::STANDARD.encode(attachment);
    let attachment: String = encoded
        .as_bytes()
        .chunks(76)
        .map(|line| format!("{}\r\n", String::from_utf8_lossy(line)))
        .collect();
    format!(
        "From: Ann Customer <{CONTACT}>\r\nTo: Me <{{to}}>\r\nSubject: Quarterly figures\r\n\
         Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{{id}}@customer.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"outer\"\r\n\r\n\
         --outer\r\nContent-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n\
         --inner\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n{text}\r\n\
         --inner\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n{html}\r\n\
         --inner--\r\n\
         --outer\r\nContent-Type: application/pdf; name=\"figures.pdf\"\r\nContent-Disposition: attachment; filename=\"figures.pdf\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{attachment}--outer--\r\n"
    )
}

/// `count` mailboxes, each its own user of location L1, and the contact
/// assigned to all of them.
fn connect_mailboxes(store: &dyn Store, count: usize) -> Vec<String> {
    let endpoint = Endpoint {
        host: "127.0.0.1".into(),
        port: 993,
        security: Security::Tls,
    };
    let cursor = FolderCursor::new(UID_VALIDITY, 1);
    let addresses: Vec<String> = (0..count).map(|n| format!("me{n}@bench.test")).collect();
    for (n, address) in addresses.iter().enumerate() {
        let mailbox = Mailbox {
            address: address.clone(),
            provider: Provider::Imap,
            credentials: Credentials::Password {
                username: address.clone(),
                password: "bench".into(),
            },
            imap: endpoint.clone(),
            smtp: endpoint.clone(),
            daily_send_limit: None,
            save_sent: Default::default(),
            state: MailboxState::Connecting,
            last_error: None,
            connected_at: Utc::now(),
            generation: 0,
            folders: Vec::new(),
        };
        let integration = Integration {
            location_id: "L1".into(),
            user_id: format!("u{n}"),
            mailbox: address.clone(),
            connected_at: Utc::now(),
            baseline: vec![(FolderRole::Inbox, cursor)],
            smart_bcc_address: "bcc@bench.test".into(),
        };
        store
            .connect(
                &mailbox,
                &integration,
                &[(FolderRole::Inbox, cursor)],
                &[],
                &[],
            )
            .expect("connect");
    }
    store
        .put_contacts(&[ContactUpsert {
            created_at_given: true,
            contact: Contact {
                location_id: "L1".into(),
                id: "c-ann".into(),
                emails: vec![CONTACT.into()],
                name: Some("Ann".into()),
                assigned_user_ids: (0..count).map(|n| format!("u{n}")).collect(),
                created_at: Utc::now() - chrono::Duration::days(30),
            },
        }])
        .expect("contact");
    addresses
}

/// What one measurement gives: its figure and, on PostgreSQL, the round
/// trips per unit.
struct Measured {
    figure: String,
    round_trips: Option<f64>,
}

/// Messages per second through ingest with `writers` mailboxes at once,
/// each message on its own (`Ingest::handle`, batch None) or in catch-up
/// batches of that many (`Ingest::batch`).
fn ingest(backend: Backend, options: &Options, writers: usize, batch: Option<u32>) -> Measured {
    let opened = open(backend, options);
    let addresses = connect_mailboxes(opened.store.as_ref(), writers);
    let smart = SmartAddresses::new("bcc-{token}@bench.test", [3; 32]).expect("smart addresses");
    let ingest = Ingest::new(
        opened.store.clone(),
        OutboxSignal::default(),
        "http://127.0.0.1:8787",
        smart,
    );
    let template = message_template();
    assert!(
        (19_000..23_000).contains(&template.len()),
        "the 21 KB message"
    );
    let per_writer = (options.messages / writers).max(1) as u32;
    let step = batch.unwrap_or(1);
    let per_writer = per_writer.div_ceil(step) * step;
    // Handles messages [first, last) of writer `n`; the events it queued.
    let run = |n: usize, first: u32, last: u32| -> usize {
        let address = &addresses[n];
        let raw_of = |uid: u32| {
            template
                .replace("{to}", address)
                .replace("{id}", &format!("m{n}-{uid}"))
        };
        // The folder's cursor before message `uid` (its next UID is the
        // message's own: messages come in UID order, from 1).
        let found = |uid: u32| Found {
            mailbox: address,
            folder: FolderRole::Inbox,
            uid_validity: UID_VALIDITY,
            uid,
            cursor: FolderCursor::new(UID_VALIDITY, uid),
            flags: None,
            labels: None,
            folder_name: "INBOX",
            received_at: None,
        };
        let queued = |outcome| match outcome {
            Ok(Outcome::Queued { events, .. }) => events,
            other => panic!("a message was not queued: {other:?}"),
        };
        let mut events = 0;
        let mut uid = first;
        while uid < last {
            match batch {
                None => {
                    events += queued(ingest.handle(found(uid), raw_of(uid).as_bytes()));
                    uid += 1;
                }
                Some(size) => {
                    let raws: Vec<(u32, String)> =
                        (uid..uid + size).map(|u| (u, raw_of(u))).collect();
                    let fetched: Vec<(Found<'_>, &[u8])> = raws
                        .iter()
                        .map(|(u, raw)| (found(*u), raw.as_bytes()))
                        .collect();
                    let mut batch = ingest.batch(&fetched).expect("sources written ahead");
                    for (u, raw) in &raws {
                        events += queued(batch.handle(found(*u), raw.as_bytes()));
                    }
                    batch.finish().expect("the batch made durable");
                    uid += size;
                }
            }
        }
        events
    };
    // A first round, not timed: connections made, caches filled.
    let mut events: usize = (0..writers).map(|n| run(n, 1, 1 + step)).sum();
    let trips_before = opened.round_trips();
    let started = Instant::now();
    events += std::thread::scope(|scope| {
        let running: Vec<_> = (0..writers)
            .map(|n| {
                let run = &run;
                scope.spawn(move || run(n, 1 + step, 1 + step + per_writer))
            })
            .collect();
        running
            .into_iter()
            .map(|writer| writer.join().expect("a writer panicked"))
            .sum::<usize>()
    });
    let elapsed = started.elapsed();
    let timed = per_writer as usize * writers;
    let all = timed + step as usize * writers;
    assert!(events >= all, "every message queued at least one event");
    assert_eq!(
        opened.store.outbox_len().expect("outbox length"),
        events,
        "every queued event is in the outbox, once"
    );
    Measured {
        figure: format!("{:.0} msg/s", timed as f64 / elapsed.as_secs_f64()),
        round_trips: trips_before
            .zip(opened.round_trips())
            .map(|(before, after)| (after - before) as f64 / timed as f64),
    }
}

type Arrivals = Arc<Mutex<Vec<(String, i64)>>>;

async fn hook(State(arrivals): State<Arrivals>, body: Bytes) -> StatusCode {
    tokio::time::sleep(Duration::from_millis(1)).await;
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) {
        let thread = json["data"]["thread_id"].as_str().unwrap_or("").to_string();
        let n = json["data"]["n"].as_i64().unwrap_or(-1);
        arrivals.lock().expect("arrivals").push((thread, n));
    }
    StatusCode::NO_CONTENT
}

/// As examples/bench_outbox.rs: `events` waiting over threads of 10 each,
/// a receiver on loopback answering each POST after 1 ms, the real
/// deliverer with its default settings. Seconds to drain them all.
fn drain(backend: Backend, options: &Options) -> Measured {
    let opened = open(backend, options);
    let store = opened.store.clone();
    let events = options.events;
    let threads = events.div_ceil(10);
    let backlog: Vec<Event> = (0..events)
        .map(|n| {
            let thread = format!("thr_{:06}", n % threads);
            Event {
                id: format!("evt_{n:08}"),
                kind: "message.inbound".into(),
                timestamp: Utc::now(),
                ordering_key: thread.clone(),
                data: serde_json::json!({"thread_id": thread, "n": n, "subject": "Quarterly figures", "text": "The figures are attached."}),
            }
        })
        .collect();
    for chunk in backlog.chunks(1_000) {
        store.enqueue(chunk).expect("enqueue");
    }
    let trips_before = opened.round_trips();
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let (arrivals, drained) = runtime.block_on(async {
        let arrivals: Arrivals = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let url = format!(
            "http://{}/hook",
            listener.local_addr().expect("its address")
        );
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(arrivals.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
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
        .expect("the deliverer");
        let shutdown = CancellationToken::new();
        let started = Instant::now();
        let running = tokio::spawn(deliverer.run(shutdown.clone()));
        let deadline = Instant::now() + Duration::from_secs(600);
        while arrivals.lock().expect("arrivals").len() < events && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let drained = started.elapsed();
        shutdown.cancel();
        let _ = running.await;
        let arrivals = arrivals.lock().expect("arrivals").clone();
        (arrivals, drained)
    });
    drop(runtime);
    let mut last: HashMap<&str, i64> = HashMap::new();
    let mut out_of_order = 0;
    for (thread, n) in &arrivals {
        if last.get(thread.as_str()).is_some_and(|&before| before > *n) {
            out_of_order += 1;
        }
        last.insert(thread, *n);
    }
    let distinct: HashSet<i64> = arrivals.iter().map(|(_, n)| *n).collect();
    // A figure for a drain that lost, doubled or reordered events is no
    // figure: the run fails instead.
    assert_eq!(arrivals.len(), events, "every event arrives, once");
    assert_eq!(distinct.len(), events, "no event arrives twice");
    assert!(distinct.iter().all(|n| (0..events as i64).contains(n)));
    assert_eq!(out_of_order, 0, "each thread's events in order");
    assert_eq!(
        store.outbox_len().expect("outbox length"),
        0,
        "the outbox empty"
    );
    Measured {
        figure: format!(
            "{:.2} s ({:.0} events/s)",
            drained.as_secs_f64(),
            events as f64 / drained.as_secs_f64()
        ),
        round_trips: trips_before
            .zip(opened.round_trips())
            .map(|(before, after)| (after - before) as f64 / events as f64),
    }
}

/// `Store::accept_send` as the API's send path calls it (step 4 of
/// `POST .../messages`), one send at a time, each opening a thread of its
/// own, with an Idempotency-Key and no daily limit (an IMAP mailbox's
/// default). Median and p99 of the call.
fn sends(backend: Backend, options: &Options) -> Measured {
    let opened = open(backend, options);
    let store = opened.store.as_ref();
    let mailbox = "me0@bench.test";
    let copy = message_template()
        .replace("{to}", CONTACT)
        .replace("{id}", "send");
    let record = |n: usize| {
        let id = format!("msg_{n:06}");
        let thread_id = format!("thr_send_{n:06}");
        SendRecord {
            id: id.clone(),
            location_id: "L1".into(),
            user_id: "u0".into(),
            contact_id: "c-ann".into(),
            mailbox: mailbox.into(),
            thread_id: thread_id.clone(),
            message_id: format!("<{id}@bench.test>"),
            status: SendStatus::Queued,
            error: None,
            smtp_response: None,
            attempts: 0,
            next_attempt_ms: 0,
            created_at: Utc::now(),
            sent_at: None,
            idempotency_key: Some(format!("key-{n}")),
            recipients: vec![CONTACT.into()],
            data: MessageEventData {
                id,
                location_id: "L1".into(),
                user_id: "u0".into(),
                contact_id: "c-ann".into(),
                contact_ids: vec!["c-ann".into()],
                thread_id,
                mailbox: mailbox.into(),
                direction: Direction::Outbound,
                origin: Origin::Crm,
                message_id: None,
                in_reply_to: None,
                references: vec![],
                from: None,
                to: vec![],
                cc: vec![],
                bcc: vec![],
                subject: Some("Quarterly figures".into()),
                date: None,
                text: Some("The figures are attached.".into()),
                html: None,
                attachments: vec![],
            },
            filed_in_sent: false,
            filing_attempts: 0,
            filing_abandoned: false,
            outcome_checks: 0,
            submitted_message_id: None,
        }
    };
    let thread = |record: &SendRecord| Thread {
        id: record.thread_id.clone(),
        mailbox: mailbox.into(),
        routes: vec![ThreadRoute {
            location_id: "L1".into(),
            user_id: "u0".into(),
            contact_id: "c-ann".into(),
        }],
        created_at: Utc::now(),
        message_ids: vec![record.message_id.clone()],
        subject: Some("Quarterly figures".into()),
    };
    let accept = |record: &SendRecord| {
        let thread = thread(record);
        store.accept_send(
            &NewSend {
                record,
                submitted: copy.as_bytes(),
                filed: copy.as_bytes(),
                thread: &thread,
                thread_before: None,
                events: &[],
            },
            None,
            Utc::now().timestamp_millis(),
        )
    };
    // A first send, not timed: connections made.
    let warm_up = record(options.sends);
    assert_eq!(
        accept(&warm_up).expect("accepted"),
        SendAcceptance::Accepted
    );
    let trips_before = opened.round_trips();
    let mut latencies = Vec::with_capacity(options.sends);
    for n in 0..options.sends {
        let record = record(n);
        let started = Instant::now();
        let answer = accept(&record).expect("accept_send");
        latencies.push(started.elapsed());
        assert_eq!(answer, SendAcceptance::Accepted, "send {n} accepted");
    }
    let trips_after = opened.round_trips();
    // The same key again is the first send's answer, not a second send.
    let mut again = record(0);
    again.id = "msg_again".into();
    match accept(&again).expect("accept_send") {
        SendAcceptance::Repeat(first) => assert_eq!(first.id, "msg_000000"),
        other => panic!("a repeated Idempotency-Key was not a repeat: {other:?}"),
    }
    let queued: Vec<String> = store
        .unsettled_sends()
        .expect("the send queue")
        .into_iter()
        .map(|send| send.id)
        .collect();
    let distinct: HashSet<&String> = queued.iter().collect();
    assert_eq!(queued.len(), options.sends + 1, "each send queued once");
    assert_eq!(distinct.len(), queued.len(), "no send queued twice");
    assert!(
        (0..options.sends).all(|n| distinct.contains(&format!("msg_{n:06}"))),
        "every accepted send is in the queue"
    );
    latencies.sort();
    let at = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Measured {
        figure: format!("p99 {:.2} ms (median {:.2} ms)", ms(at(0.99)), ms(at(0.5))),
        round_trips: trips_before
            .zip(trips_after)
            .map(|(before, after)| (after - before) as f64 / options.sends as f64),
    }
}

/// PostgreSQL's version and the settings that decide what a commit costs.
fn server_facts(url: &str) -> String {
    let mut client = postgres::Client::connect(url, postgres::NoTls).expect("PostgreSQL");
    let show = |client: &mut postgres::Client, what: &str| -> String {
        client
            .query_one(&format!("SHOW {what}"), &[])
            .map(|row| row.get::<_, String>(0))
            .unwrap_or_else(|err| format!("? ({err})"))
    };
    let version = show(&mut client, "server_version");
    let settings: Vec<String> = [
        "fsync",
        "synchronous_commit",
        "wal_sync_method",
        "full_page_writes",
        "shared_buffers",
        "max_connections",
    ]
    .iter()
    .map(|name| format!("{name}={}", show(&mut client, name)))
    .collect();
    format!(
        "PostgreSQL {version} on loopback TCP; {}",
        settings.join(", ")
    )
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|kb| kb.trim().trim_end_matches(" kB").parse::<f64>().ok())
        .map_or("?".into(), |kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0));
    format!("{cores} cores ({model}), {memory}")
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    mailbridge::tls::install_crypto_provider();
    let options = options();
    let command: Vec<String> = std::env::args().collect();
    let started_load = load();
    let scratch: PathBuf = std::env::temp_dir();

    // A measurement that fails its checks (or whose engine gives up) is
    // shown as failed, with the first reason, and the run goes on.
    let reasons: Arc<Mutex<Vec<String>>> = Arc::default();
    let kept = reasons.clone();
    std::panic::set_hook(Box::new(move |info| {
        let reason = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into());
        eprintln!("failed: {reason}");
        kept.lock().unwrap_or_else(|p| p.into_inner()).push(reason);
    }));
    let guarded = |backend: Backend, measure: &dyn Fn(Backend) -> Measured| {
        reasons.lock().unwrap_or_else(|p| p.into_inner()).clear();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| measure(backend))).unwrap_or_else(
            |_| {
                let first = reasons
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .first()
                    .cloned()
                    .unwrap_or_default();
                Measured {
                    figure: format!("**failed**: {first}"),
                    round_trips: None,
                }
            },
        )
    };
    let mut rows: Vec<(String, Measured, Measured)> = Vec::new();
    let mut both = |name: String, measure: &dyn Fn(Backend) -> Measured| {
        let sled = guarded(Backend::Sled, measure);
        let postgres = guarded(Backend::Postgres, measure);
        eprintln!(
            "{name}: sled {}, PostgreSQL {}",
            sled.figure, postgres.figure
        );
        rows.push((name, sled, postgres));
    };
    for writers in [1, 4, 16] {
        both(
            format!("ingest, 21 KB, message by message, {writers} writer(s)"),
            &|backend| ingest(backend, &options, writers, None),
        );
    }
    for writers in [1, 4, 16] {
        both(
            format!("ingest, 21 KB, catch-up batches of 20, {writers} writer(s)"),
            &|backend| ingest(backend, &options, writers, Some(20)),
        );
    }
    both(
        format!("outbox drain of {} events", options.events),
        &|backend| drain(backend, &options),
    );
    both(
        format!("accept_send, {} sends one at a time", options.sends),
        &|backend| sends(backend, &options),
    );

    println!("```sh\n{}\n```\n", command.join(" "));
    println!(
        "Machine: {}; load average {started_load} at the start, {} at the end; sled in {} \
         on the same disk as PostgreSQL's data. {}; pool of {} connections.\n",
        machine(),
        load(),
        scratch.display(),
        server_facts(&options.postgres),
        options.pool,
    );
    println!("| measurement | sled | PostgreSQL | PostgreSQL round trips per unit |");
    println!("|---|---|---|---|");
    for (name, sled, postgres) in &rows {
        println!(
            "| {name} | {} | {} | {} |",
            sled.figure,
            postgres.figure,
            postgres
                .round_trips
                .map_or("".into(), |trips| format!("{trips:.1}"))
        );
    }
    println!(
        "\nChecked: every message queued and its events in the outbox once; every event \
         delivered once and in thread order, the outbox empty; every send accepted and \
         queued once, a repeated key answered as a repeat."
    );
}
