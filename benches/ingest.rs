//! Ingest throughput on one core: parse + route + index + durable enqueue
//! (`Ingest::handle`, the path every fetched message takes), over messages
//! of real shapes, into a sled store on disk with its fsyncs.
//!
//!     cargo bench --bench ingest
//!
//! The same messages are written to `target/bench-ingest/*.eml`, so
//! `scripts/bench-python-email.py` can parse them with Python's `email`
//! package for comparison.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

use chrono::Utc;
use mailbridge::{
    ingest::{Found, Ingest, Outcome},
    model::{
        Contact, Credentials, Endpoint, FolderCursor, FolderRole, Integration, Mailbox,
        MailboxState, Provider, Security,
    },
    smart_address::SmartAddresses,
    store::{SledStore, Store, secret_box::SecretBox},
    webhook::OutboxSignal,
};

fn main() {
    write_fixtures();
    divan::main();
}

const ME: &str = "me@bench.test";
const ANN: &str = "ann@customer.test";

/// A message from the contact to the user; `{id}` is made unique per message.
fn headers(content_type: &str) -> String {
    format!(
        "From: Ann Customer <{ANN}>\r\nTo: Me <{ME}>\r\nSubject: Quarterly figures\r\n\
         Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{{id}}@customer.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: {content_type}\r\n\r\n"
    )
}

/// Lines of text as mail clients wrap them (under 76 characters).
fn paragraph(words: usize) -> String {
    let line = "The figures for the quarter are attached, with the notes from Monday.\r\n";
    line.repeat(words / 12 + 1)
}

fn base64_lines(bytes: &[u8]) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
    encoded
        .as_bytes()
        .chunks(76)
        .map(|line| format!("{}\r\n", String::from_utf8_lossy(line)))
        .collect()
}

/// Plain text, about 1 KB.
fn plain() -> String {
    format!(
        "{}{}\r\n",
        headers("text/plain; charset=utf-8"),
        paragraph(150)
    )
}

/// multipart/mixed: multipart/alternative (text + HTML) and a small PDF-like
/// attachment, about 21 KB, the shape of an ordinary business mail.
fn alternative_with_attachment() -> String {
    let text = paragraph(700);
    let html = format!("<html><body><p>{}</p></body></html>", paragraph(700));
    let attachment: Vec<u8> = (0..9_000u32).map(|i| (i * 31 % 251) as u8).collect();
    format!(
        "{}--outer\r\nContent-Type: multipart/alternative; boundary=\"inner\"\r\n\r\n\
         --inner\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n{text}\r\n\
         --inner\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n{html}\r\n\
         --inner--\r\n\
         --outer\r\nContent-Type: application/pdf; name=\"figures.pdf\"\r\nContent-Disposition: attachment; filename=\"figures.pdf\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}--outer--\r\n",
        headers("multipart/mixed; boundary=\"outer\""),
        base64_lines(&attachment),
    )
}

/// A short text and a 2 MB attachment.
fn large_attachment() -> String {
    let attachment: Vec<u8> = (0..1_500_000u32).map(|i| (i * 7 % 253) as u8).collect();
    format!(
        "{}--outer\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nThe scans, as promised.\r\n\
         --outer\r\nContent-Type: application/zip; name=\"scans.zip\"\r\nContent-Disposition: attachment; filename=\"scans.zip\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}--outer--\r\n",
        headers("multipart/mixed; boundary=\"outer\""),
        base64_lines(&attachment),
    )
}

/// A store with users' mailboxes connected and the contact assigned to each.
struct Bench {
    _dir: tempfile::TempDir,
    ingest: Ingest,
    /// Per mailbox, the next UID.
    next_uids: Vec<AtomicU32>,
    addresses: Vec<String>,
}

const UID_VALIDITY: u32 = 7;

impl Bench {
    fn new() -> Bench {
        Bench::with_mailboxes(1)
    }

    /// `count` mailboxes, each its own user of location L1: writers on
    /// different mailboxes commit at once, as many IDLE sessions do.
    fn with_mailboxes(count: usize) -> Bench {
        let dir = tempfile::tempdir().expect("a scratch folder");
        let store: Arc<dyn Store> = Arc::new(
            SledStore::open(dir.path(), SecretBox::from_key(&[7; 32])).expect("the store"),
        );
        let endpoint = Endpoint {
            host: "127.0.0.1".into(),
            port: 993,
            security: Security::Tls,
        };
        let addresses: Vec<String> = (0..count)
            .map(|n| match n {
                0 => ME.to_string(),
                n => format!("me{n}@bench.test"),
            })
            .collect();
        let cursor = FolderCursor::new(UID_VALIDITY, 1);
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
            .put_contacts(&[mailbridge::store::ContactUpsert {
                created_at_given: true,
                contact: Contact {
                    location_id: "L1".into(),
                    id: "c-ann".into(),
                    emails: vec![ANN.into()],
                    name: Some("Ann".into()),
                    assigned_user_ids: (0..count).map(|n| format!("u{n}")).collect(),
                    created_at: Utc::now() - chrono::Duration::days(30),
                },
            }])
            .expect("contact");
        let smart =
            SmartAddresses::new("bcc-{token}@bench.test", [3; 32]).expect("smart addresses");
        let ingest = Ingest::new(
            store,
            OutboxSignal::default(),
            "http://127.0.0.1:8787",
            smart,
        );
        Bench {
            _dir: dir,
            ingest,
            next_uids: (0..count).map(|_| AtomicU32::new(1)).collect(),
            addresses,
        }
    }

    /// Handles one new message, as the INBOX watcher does after a FETCH.
    fn handle(&self, template: &str) {
        self.handle_in(0, template);
    }

    /// The same in mailbox `n`; one writer per mailbox at a time.
    fn handle_in(&self, n: usize, template: &str) {
        let uid = self.next_uids[n].fetch_add(1, Ordering::Relaxed);
        let raw = self.raw_in(n, template, uid);
        match self.ingest.handle(self.found_in(n, uid), raw.as_bytes()) {
            Ok(Outcome::Queued { .. }) => {}
            other => panic!("the message was not queued: {other:?}"),
        }
    }

    /// Message `uid` of mailbox `n`, from a fixture template.
    fn raw_in(&self, n: usize, template: &str, uid: u32) -> String {
        template.replace("{id}", &format!("m{n}-{uid}")).replace(
            &format!("To: Me <{ME}>"),
            &format!("To: Me <{}>", self.addresses[n]),
        )
    }

    /// Where message `uid` of mailbox `n` was found: its INBOX, new.
    fn found_in(&self, n: usize, uid: u32) -> Found<'_> {
        Found {
            mailbox: &self.addresses[n],
            folder: FolderRole::Inbox,
            uid_validity: UID_VALIDITY,
            uid,
            cursor: FolderCursor::new(UID_VALIDITY, uid),
            flags: None,
            labels: None,
            folder_name: "INBOX",
            received_at: None,
        }
    }

    /// A catch-up batch of `count` new messages in mailbox `n`, as the
    /// watcher handles one FETCH: sources written ahead, each message
    /// committed, one flush for all.
    fn handle_batch_in(&self, n: usize, template: &str, count: u32) {
        let first = self.next_uids[n].fetch_add(count, Ordering::Relaxed);
        let raws: Vec<(u32, String)> = (first..first + count)
            .map(|uid| (uid, self.raw_in(n, template, uid)))
            .collect();
        let found = |uid: u32| self.found_in(n, uid);
        let fetched: Vec<(Found<'_>, &[u8])> = raws
            .iter()
            .map(|(uid, raw)| (found(*uid), raw.as_bytes()))
            .collect();
        let mut batch = self.ingest.batch(&fetched).expect("sources written ahead");
        for (uid, raw) in &raws {
            match batch.handle(found(*uid), raw.as_bytes()) {
                Ok(Outcome::Queued { .. }) => {}
                other => panic!("the message was not queued: {other:?}"),
            }
        }
        batch.finish().expect("the batch made durable");
    }
}

fn write_fixtures() {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-ingest");
    std::fs::create_dir_all(&folder).expect("target/bench-ingest can be created");
    for (name, message) in [
        ("plain", plain()),
        ("alternative-21k", alternative_with_attachment()),
        ("attachment-2m", large_attachment()),
    ] {
        std::fs::write(
            folder.join(format!("{name}.eml")),
            message.replace("{id}", "m1"),
        )
        .expect("a fixture for scripts/bench-python-email.py can be written");
    }
}

#[divan::bench(name = "plain (1 KB)")]
fn plain_message(bencher: divan::Bencher) {
    let bench = Bench::new();
    let message = plain();
    bencher
        .counter(divan::counter::ItemsCount::new(1usize))
        .bench_local(|| bench.handle(&message));
}

#[divan::bench(name = "multipart/alternative + attachment (21 KB)")]
fn alternative_message(bencher: divan::Bencher) {
    let bench = Bench::new();
    let message = alternative_with_attachment();
    assert!(
        (19_000..23_000).contains(&message.len()),
        "{} bytes",
        message.len()
    );
    bencher
        .counter(divan::counter::ItemsCount::new(1usize))
        .bench_local(|| bench.handle(&message));
}

#[divan::bench(name = "2 MB attachment", sample_count = 20, sample_size = 1)]
fn large_message(bencher: divan::Bencher) {
    let bench = Bench::new();
    let message = large_attachment();
    bencher
        .counter(divan::counter::ItemsCount::new(1usize))
        .bench_local(|| bench.handle(&message));
}

/// The CPU part alone: `mime::parse` of the same messages, no store.
mod parse_only {
    use super::*;

    #[divan::bench(name = "parse only: plain (1 KB)")]
    fn plain_message(bencher: divan::Bencher) {
        let message = plain().replace("{id}", "m1");
        bencher
            .counter(divan::counter::ItemsCount::new(1usize))
            .bench_local(|| mailbridge::mime::parse(message.as_bytes()));
    }

    #[divan::bench(name = "parse only: multipart/alternative + attachment (21 KB)")]
    fn alternative_message(bencher: divan::Bencher) {
        let message = alternative_with_attachment().replace("{id}", "m1");
        bencher
            .counter(divan::counter::ItemsCount::new(1usize))
            .bench_local(|| mailbridge::mime::parse(message.as_bytes()));
    }

    #[divan::bench(name = "parse only: 2 MB attachment", sample_count = 20)]
    fn large_message(bencher: divan::Bencher) {
        let message = large_attachment().replace("{id}", "m1");
        bencher
            .counter(divan::counter::ItemsCount::new(1usize))
            .bench_local(|| mailbridge::mime::parse(message.as_bytes()));
    }
}

/// Group commit: the 21 KB message, with that many mailboxes committing at
/// once (one thread each); messages per second counts all of them.
#[divan::bench(name = "21 KB, mailboxes committing at once", threads = [1, 4, 16], sample_count = 30)]
fn alternative_concurrently(bencher: divan::Bencher) {
    use std::{collections::HashMap, sync::Mutex, thread::ThreadId};
    let bench = Bench::with_mailboxes(16);
    let message = alternative_with_attachment();
    // Each benchmark thread writes to a mailbox of its own.
    let writers: Mutex<HashMap<ThreadId, usize>> = Mutex::default();
    bencher
        .counter(divan::counter::ItemsCount::new(1usize))
        .bench(|| {
            let writer = {
                let mut writers = writers.lock().expect("writers");
                let next = writers.len();
                *writers
                    .entry(std::thread::current().id())
                    .or_insert(next % 16)
            };
            bench.handle_in(writer, &message)
        });
}

/// A catch-up batch: the 21 KB message, 20 to a FETCH as the watcher asks
/// for them, made durable together; with 1, 4 and 16 mailboxes catching up
/// at once (one thread each). Messages per second counts every message.
#[divan::bench(name = "21 KB, catch-up batches of 20", threads = [1, 4, 16], sample_count = 30)]
fn alternative_in_batches(bencher: divan::Bencher) {
    use std::{collections::HashMap, sync::Mutex, thread::ThreadId};
    const BATCH: u32 = 20;
    let bench = Bench::with_mailboxes(16);
    let message = alternative_with_attachment();
    let writers: Mutex<HashMap<ThreadId, usize>> = Mutex::default();
    bencher
        .counter(divan::counter::ItemsCount::new(BATCH as usize))
        .bench(|| {
            let writer = {
                let mut writers = writers.lock().expect("writers");
                let next = writers.len();
                *writers
                    .entry(std::thread::current().id())
                    .or_insert(next % 16)
            };
            bench.handle_batch_in(writer, &message, BATCH)
        });
}
